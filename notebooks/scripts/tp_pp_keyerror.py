"""The smallest reproduction: transformers 5.25 (as 5.24) cannot load a model with tensor and pipeline parallelism
together.

    torchrun --standalone --nproc-per-node 4 scripts/tp_pp_keyerror.py

Every rank stops with a ``KeyError`` for a weight that another pipeline stage holds: the first stage's ranks with
``'model.layers.N.self_attn.q_proj.weight'``, N a layer of the second stage; the second stage's ranks with that or
with ``'model.embed_tokens.weight'``, which the first stage holds (seen in a CI run: rank 3 failed first with it). The
tensor-parallel plan is expanded over every layer before the pipeline replaces the other stages' modules with
placeholders, and applying the plan then looks their weights up. (labkit.compat.tp_plan_skips_other_stages
is the workaround notebook 05 uses.)
"""

import tempfile

from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.distributed import DistributedConfig

config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
with tempfile.TemporaryDirectory() as folder:
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_size=2, pp_size=2))
print("loaded: this transformers combines TP and PP")
