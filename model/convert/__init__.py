"""Pure dict -> dict conversions of foreign checkpoints to our parameter names: timm, Hugging Face, the paper's .npz."""
