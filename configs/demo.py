"""The demo: a small model learning S4 on the synthetic AVSBench, on a CPU.

Every frame of the synthetic set shows 2-3 objects and only the one whose
class sound plays is in the mask, so the task can only be solved from the
audio. The data is written and prepared into the workdir when absent; at the
end the best checkpoint is scored with the true and with shuffled audio:

  python main.py --config=configs/demo.py --workdir=/tmp/avsegformer_demo

Differences from the paper's S4 config (all for a 2-core CPU budget): PVTv2-B0
with a 64-wide, one-layer head, 64x64 frames, 16 queries,
a higher learning rate, no dropout, the visual backbone left frozen at its
random initialisation (only `audio_proj` and the head learn: the synthetic
shapes need no trained backbone, and each step is far cheaper), and training
on frame 0 only (the only frame S4 supervises; PVTv2 has no batch norm, so
the gradient is the same as with all five frames, at a fifth of the cost).
"""
from configs import default


def get_config(arg=None):
  c = default.get_config()
  c.task = "s4"
  m = c.model
  m.pvt_variant = "b0"
  m.embed_dim = 64
  m.num_heads = 4
  m.num_points = 4
  m.num_encoder_layers = 1
  m.num_decoder_layers = 1
  m.num_query_layers = 1
  m.encoder_ffn_dim = m.decoder_ffn_dim = m.query_ffn_dim = 128
  m.num_queries = 16
  m.head_mlp_dim = 64
  m.dropout = 0.0
  m.drop_path = 0.0

  d = c.data
  d.image_size = 64
  d.num_frames = 5
  d.train_num_frames = 1         # S4 supervises frame 0; no BN in PVTv2
  d.num_workers = 0
  d.synthetic.update(enabled=True, num_videos=240, size=64, seed=0)

  t = c.train
  t.batch_size = 8
  t.num_epochs = 12
  t.learning_rate = 1e-3
  t.freeze_backbone_epochs = 10**6     # backbone stays random and frozen
  t.log_every_steps = 10
  c.checkpoint.every_steps = 100
  c.eval.batch_size = 8
  c.eval.num_visualize = 4
  c.eval.shuffled_audio_control = True
  return default.apply_backbone(c, arg)
