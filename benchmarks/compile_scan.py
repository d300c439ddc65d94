"""Compile time of a forward + backward of a narrow VTP (trunk, pixel decoder and text tower all
`depth` blocks deep), unrolled blocks vs one nn.scan (model.scan_layers), side by side:

  python benchmarks/compile_scan.py [none|full]     # the remat policy

Compile time grows with depth when unrolled and stays flat when scanned, which is what makes
VTP-L and DiT-XL compile in minutes."""
import sys, time
import jax, jax.numpy as jnp
from vtp_jax import config as config_lib
from vtp_jax.models.vtp import VTP, param_shapes

def cfg(depth, scan, remat):
    c = config_lib.model_config()
    c.patch_size, c.width, c.depth, c.num_heads, c.latent_dim = 8, 64, depth, 2, 16
    c.decoder.width, c.decoder.depth, c.decoder.num_heads = 64, depth, 2
    c.text.width, c.text.depth, c.text.num_heads, c.text.vocab_size, c.text.context_length = 64, depth, 2, 512, 16
    c.clip_dim, c.head.prototypes, c.remat, c.scan_layers = 64, 0, remat, scan
    return c

def measure(depth, scan, remat):
    c = cfg(depth, scan, remat)
    model = VTP(c)
    params = param_shapes(c)
    images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

    def loss(p, images, tokens, rng):
        def call(m):
            f = m.encode_features(images, drop_rate=0.1)
            rec = m.decode(m.bottleneck(f["patches"]), drop_rate=0.1)
            return jnp.mean((rec - images) ** 2) + jnp.mean(m.clip_image(f) @ m.clip_text(tokens).T)
        return model.apply({"params": p}, method=call, rngs={"drop_path": rng})

    t0 = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(params, images, tokens, rng)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1

remat = sys.argv[1] if len(sys.argv) > 1 else "none"
for depth in (4, 24):
    for scan in (False, True):
        lower, comp = measure(depth, scan, remat)
        print(f"remat={remat} depth={depth:2d} scan={scan!s:5}: trace+lower {lower:6.2f} s  compile {comp:6.2f} s", flush=True)
