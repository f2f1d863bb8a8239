"""A tiny model for tests and smoke runs: PVTv2-B0 (or ResNet-50), 1+1+1
layers, 8 queries, 64x64 frames. Same code paths as the real configs."""
from configs import default


def get_config(arg=None):
  c = default.get_config()
  c.task = "s4"
  c.model.pvt_variant = "b0"
  c.model.embed_dim = 64
  c.model.num_heads = 8
  c.model.num_points = 2
  c.model.num_encoder_layers = 1
  c.model.num_decoder_layers = 1
  c.model.num_query_layers = 1
  c.model.encoder_ffn_dim = 128
  c.model.decoder_ffn_dim = 128
  c.model.query_ffn_dim = 128
  c.model.num_queries = 8
  c.model.head_mlp_dim = 32
  # 4096 would make VGGish 96% of the tiny model: ~290 MB in every checkpoint.
  c.model.vggish_fc_dim = 128
  c.data.image_size = 64
  c.data.num_frames = 2
  c.train.batch_size = 2
  c.eval.batch_size = 2
  return default.apply_backbone(c, arg)
