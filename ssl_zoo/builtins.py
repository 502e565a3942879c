"""Import the core's own registry entries (datasets, strategies, launchers) so lookups find them."""
import ssl_zoo.data.datasets  # noqa: F401
import ssl_zoo.engine.strategy  # noqa: F401
import ssl_zoo.launch.local  # noqa: F401
