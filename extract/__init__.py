"""Stage one: run a backbone once per text and cache pooled hidden states of every layer."""
