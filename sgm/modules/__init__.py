"""`sgm.modules.GeneralConditioner` is the path the published SDXL yamls name."""
from sgm.modules.encoders.modules import GeneralConditioner

__all__ = ["GeneralConditioner"]
