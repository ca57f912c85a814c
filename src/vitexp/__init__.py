"""vitexp: pretrain a ViT on A, fine-tune on B, run the paper's ablations and figures."""
