"""AVSBench MS3 (multiple sources): 512x512, T=5, Dice on every frame."""
from configs import default


def get_config(arg=None):
  c = default.get_config()
  c.task = "ms3"
  c.data.image_size = 512
  c.data.num_frames = 5
  c.train.batch_size = 2
  c.train.num_epochs = 60
  c.train.freeze_backbone_epochs = 10
  c.train.loss = "dice"
  c.train.first_frame_only = False
  return default.apply_backbone(c, arg)
