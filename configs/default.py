"""Every config field, with the original AVSegFormer's values.

Task configs (`s4.py`, `ms3.py`, `avss.py`) start from `get_config()` here and
override only what their experiment changes, as in flax `examples/imagenet`.
"""
import ml_collections

BACKBONES = ("res50", "pvt2")


def get_config():
  c = ml_collections.ConfigDict()
  c.task = "s4"                  # s4 | ms3 | avss
  c.seed = 0

  # ---------------------------------------------------------------- model --
  m = c.model = ml_collections.ConfigDict()
  m.backbone = "pvt2"            # res50 | pvt2
  m.pvt_variant = "b5"           # b0..b5 (only with backbone=pvt2)
  m.num_classes = 1
  m.embed_dim = 256
  m.num_heads = 8
  m.num_levels = 3               # encoder levels (strides 8/16/32)
  m.num_points = 4
  m.num_encoder_layers = 6
  m.num_decoder_layers = 6
  m.num_query_layers = 6
  m.encoder_ffn_dim = 2048
  m.decoder_ffn_dim = 2048
  m.query_ffn_dim = 1024
  m.num_queries = 300
  m.learnable_queries = True     # Table 2: learnable queries on/off
  m.mixer = "cha"                # cha | cra | none (Table 2 / Fig. 4)
  m.vggish_fc_dim = 4096         # VGGish's hidden FCs (the release's; tests narrow it)
  m.head_mlp_dim = 2048          # the 300->2048->2048->256 MLP over the query axis
  m.dropout = 0.1                # encoder / decoder dropout (train only)
  # On the decoder's attention maps; unset: model.dropout (as the original). 0 lets
  # attention_impl=cudnn fuse the decoder's attention in training too.
  m.attention_dropout = ml_collections.config_dict.placeholder(float)
  # Dropout masks: bernoulli (flax's nn.Dropout bits) | hash (a counter hash
  # computed where the mask is used: no bits or masks in memory; on an H200 the
  # same step time, 13% less memory).
  m.dropout_impl = "bernoulli"
  m.drop_path = 0.1              # PVTv2 stochastic depth (train only)
  m.dtype = "float32"            # compute dtype: float32 | bfloat16 (params stay float32)
  m.remat = False                # rematerialise transformer / backbone blocks
  m.remat_policy = "full"        # full: recompute all | dots: keep weight GEMMs' outputs
  m.scan_layers = False          # nn.scan over repeated identical layers
  m.msda_impl = "auto"           # MSDA core: auto (taps; TPU: dense to 320 px, then gather4) | taps | rows | fused | gather4 | dense | pallas (GPU)
  m.attention_impl = "xla"       # dense attention: xla | cudnn (flash attention; bf16 on NVIDIA GPUs; H200: train 33% slower)

  # ----------------------------------------------------------------- data --
  d = c.data = ml_collections.ConfigDict()
  d.name = "avsbench"
  d.data_dir = ""                # TFDS data dir ("" = TFDS default)
  d.manual_dir = ""              # raw AVSBench download (for preparation)
  d.image_size = 512             # S4/MS3 loaders resize to 512 (not 224)
  d.num_frames = 5
  d.train_num_frames = -1        # >0: train on the first k frames only (see input_pipeline)
  d.train_split = "train"
  d.eval_split = "validation"
  d.num_workers = 2
  d.shuffle_seed = 0
  # The synthetic AVSBench, generated and prepared into the workdir (demo).
  d.synthetic = ml_collections.ConfigDict(
      dict(enabled=False, num_videos=60, size=96, seed=0))

  # ---------------------------------------------------------------- train --
  t = c.train = ml_collections.ConfigDict()
  t.batch_size = 2               # clips per global batch (B); frames = B*T
  # >1: each optimizer update averages the gradients of this many batches
  # (optax.MultiSteps): k*B clips per update where B fit no device.
  t.grad_accum_steps = 1
  t.num_epochs = 30
  t.learning_rate = 2e-5
  t.weight_decay = 0.01
  t.adam_eps = 1e-8              # torch.optim.AdamW's default, as the original
  t.freeze_backbone_epochs = 5   # visual backbone frozen for the first N epochs
  t.loss = "dice"                # dice | bce | ce
  t.iou_loss_weight = 1.0
  t.mix_loss_weight = 0.1
  t.first_frame_only = True      # S4 supervises frame 0 of each clip only
  t.log_every_steps = 50
  t.max_steps = -1               # >0 stops early (benchmarks, smoke tests)
  t.prng_impl = "threefry2x32"   # dropout bits: threefry2x32 | rbg (faster on GPU)

  # ----------------------------------------------------------- checkpoint --
  k = c.checkpoint = ml_collections.ConfigDict()
  k.keep = 3                     # latest N
  k.every_steps = 500
  k.keep_best = True             # also keep the best by validation mIoU

  # ----------------------------------------------------------------- eval --
  e = c.eval = ml_collections.ConfigDict()
  e.batch_size = 2
  e.num_visualize = 8            # clips whose masks / overlays are written (-1: all)
  e.shuffled_audio_control = False   # after training: mIoU with shuffled audio

  # ------------------------------------------------- pretrained weights ----
  p = c.pretrained = ml_collections.ConfigDict()
  p.backbone = ""                # ImageNet ResNet-50 or official PVTv2 .pth
  p.vggish = ""                  # vggish-10086976.pth
  p.checkpoint = ""              # full model: a released AVSegFormer .pth, or our export / workdir / step dir
  return c


def apply_backbone(c, arg):
  """`--config=configs/s4.py:res50` chooses the visual backbone."""
  arg = (arg or "pvt2").strip()
  if arg not in BACKBONES:
    raise ValueError(f"config arg must be one of {BACKBONES}, got {arg!r}")
  c.model.backbone = arg
  return c
