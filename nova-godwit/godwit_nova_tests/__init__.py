# Nova's functional tests run under eventlet: patch before anything else
# imports.
from nova import monkey_patch

monkey_patch.patch()
