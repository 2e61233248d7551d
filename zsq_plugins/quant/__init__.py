"""Quantization arithmetic shared by the core: BN folding, fake quantization, range search,
and a small reference simulator used to measure calibration data without any toolkit."""
