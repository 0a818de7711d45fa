"""The paper's headline experiment, reproduced on data that installs offline.

A ViT-Tiny-shaped model trained from scratch on Fashion-MNIST with Q3R, and the baselines
(dense AdamW + SVD truncation, LoRA from scratch, LoRITa) in the same harness, the same data,
the same training budget and the same evaluation. Run it with ``q3r experiment vit-fmnist``;
see docs/experiment.md. Nothing here is imported by ``import q3r``.
"""
