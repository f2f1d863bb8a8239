"""Datasets: the AVSBench TFDS builder and its synthetic twin (`datasets.avsbench`)."""
