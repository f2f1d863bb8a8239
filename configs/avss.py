"""AVSBench AVSS (semantic, 71 classes): 224x224, T=10, cross entropy."""
from configs import default


def get_config(arg=None):
  c = default.get_config()
  c.task = "avss"
  c.model.num_classes = 71
  c.data.image_size = 224
  c.data.num_frames = 10
  c.train.batch_size = 4
  c.eval.batch_size = 4
  c.train.num_epochs = 30
  c.train.freeze_backbone_epochs = 0
  c.train.loss = "ce"
  c.train.first_frame_only = False
  return default.apply_backbone(c, arg)
