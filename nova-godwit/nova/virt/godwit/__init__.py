"""godwit as a Nova compute driver.

``compute_driver = godwit.GodwitDriver`` in nova.conf.
"""

from nova.virt.godwit import driver

GodwitDriver = driver.GodwitDriver
