"""Evaluators a tokenizer or a DiT is judged by (FID / IS, reconstruction, zero-shot, probes,
generation by class), named in `config.evals` and run by the runner or the standalone eval job."""
