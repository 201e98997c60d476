"""llmembed: frozen language models as text classifiers (LLMEmbed, ACL 2024).

Stage one, `llmembed.extract`, runs backbones once per text and caches pooled hidden states of every
layer (`llmembed.cache`); stage two fuses cached layers and trains light classifiers on them.
"""

from llmembed.resolvers import register_resolvers

register_resolvers()
