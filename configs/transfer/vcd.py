"""VCD-style descriptors (Menon & Vondrick 2023): class score = mean image–descriptor cosine over the class's
descriptor sentences; training-free.

  python -m vlm_jax.transfer --config=configs/transfer/vcd.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

`method.descriptors`: a JSON file {class: [sentences]} or a shipped name ('synthetic': every class of the
synthetic shift tasks, `vlm_jax/embedding/descriptions/synthetic.json`); '' uses --config.descriptions.
"""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.transfer_config(arg, {"name": "vcd", "descriptors": "synthetic"}, epochs=0)
