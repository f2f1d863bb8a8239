"""Stand-in for the original's compiled CUDA extension (not buildable on CPU).

It defines no `ms_deform_attn_forward`. The original's
`ops/modules/ms_deform_attn.py` calls the extension inside a bare
`try: ... except:` whose fallback is the repository's own pure-PyTorch core
(`ms_deform_attn_core_pytorch`), so every call takes that path: the one the
golden files in shared/reference were made with. Cost: one caught
AttributeError per encoder layer.
"""
