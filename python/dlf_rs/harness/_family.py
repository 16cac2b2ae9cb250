"""The one place dlf_rs.harness reaches into the default family's tools (the world and the demo).

The harness's local tasks are generated from the shipped family's world (evaluation sets, few-shot
prompts, metrics) and its tests compare with the demo's own scoring; importing both through this
module keeps a move of those tools a one-line change here.
"""

from dlf_rs.family import demo, world

DEFAULT_FAMILY = demo.DEFAULT_FAMILY

__all__ = ["DEFAULT_FAMILY", "demo", "world"]
