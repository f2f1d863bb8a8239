"""AVSBench S4 (single sound source): 512x512, T=5, Dice, first frame supervised."""
from configs import default


def get_config(arg=None):
  c = default.get_config()
  c.task = "s4"
  c.data.image_size = 512
  c.data.num_frames = 5
  c.train.batch_size = 2
  c.train.num_epochs = 30
  c.train.freeze_backbone_epochs = 5
  c.train.loss = "dice"
  c.train.first_frame_only = True
  return default.apply_backbone(c, arg)
