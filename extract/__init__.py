"""Stage one: run a backbone once per text and cache pooled hidden states of every layer (the
forward pass, its batching and pooling, and the plan of what is stored)."""
