"""AVSBench (S4 / MS3 / AVSS) as a TFDS dataset, plus a synthetic AVSBench.

`raw` reads the dataset as distributed (no TensorFlow), `avsbench_dataset_builder`
is the TFDS builder (`tfds build datasets/avsbench`), `synthesize` writes a
small dataset in the same on-disk layout. Nothing is imported here so that
`import datasets.avsbench.raw` stays light.
"""
