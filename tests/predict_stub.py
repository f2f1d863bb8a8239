"""A config and a stand-in model for the predict tests, which test what is
around the model (the `stub_model` fixture in conftest puts it in)."""
import numpy as np


def config():
  """The demo's small S4 model at 64 px, T = 5 (the stub tests never run it)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  c.data.image_size = 64
  c.data.num_frames = 5
  return c


def stub_forward(model, num_classes):
  """A stand-in for the model: foreground = red pixels (the circle)."""
  del model, num_classes
  def forward(variables, frames, audio, valid):
    del variables, audio, valid
    return np.asarray(frames[..., 0] - frames[..., 1] - 2.0)
  return forward
