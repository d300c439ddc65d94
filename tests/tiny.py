"""A tiny VTP config for tests; also a config file: --config=tests/tiny.py."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
    """configs/<name>.py's get_config() (with the config's string argument, if any)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def get_config(name="demo"):
    """configs/<name>.py at test size: the tiny model for a tokenizer job (--config=tests/tiny.py),
    tiny splits for the evaluators of an eval job (--config=tests/tiny.py:eval_demo)."""
    c = load_config(name)
    if "model" not in c:
        for e in c.evals.values():
            e.data.update(image_size=16, procedural_size=16, batch_size=8, num_images=16, num_train_images=32)
        c.evals = {"reconstruction": c.evals.reconstruction}
        return c
    m = c.model
    m.patch_size, m.width, m.depth, m.num_heads, m.latent_dim = 8, 32, 1, 2, 8
    m.decoder.width, m.decoder.depth, m.decoder.num_heads = 32, 1, 2
    m.text.width, m.text.depth, m.text.num_heads = 32, 1, 2
    m.clip_dim = 32  # = text width, so the model exports in the release format
    m.head.hidden_dim, m.head.bottleneck_dim, m.head.prototypes = 32, 16, 64
    d = c.data
    d.image_size, d.global_crops_size, d.local_crops_size, d.local_crops_number = 16, 16, 8, 2
    d.procedural_size = 16
    d.batch_clip, d.batch_ssl, d.batch_rec = 16, 8, 8
    c.evals = {}  # the demo's evaluators have their own tests (test_evals.py)
    c.objectives.lpips_weight = 0.0
    c.optim.warmup_steps, c.optim.lr = 0, 1e-3  # the very first update is a real one
    # Adam's eps at 1e-6 turns near-zero gradients into +-lr updates, so reduction-order noise
    # (another mesh, gloo vs in-process all-reduce) would become lr-sized differences; a larger
    # eps keeps the update continuous in the gradient, so meshes compare at float tolerance.
    c.optim.eps = 1e-3
    c.train.steps = 10
    c.train.log_every = 1
    return c


def autoencoder_config(image_size=64, batch=1024):
    """tests/tiny.py in bf16 as a plain autoencoder (l_rec only) with `batch` images of
    `image_size`: its activations dominate the step's memory, so memory follows 1 / accum_steps
    (test_aot's accumulation search, benchmarks/dcn_accum_loop.py)."""
    c = get_config()
    c.model.dtype = "bfloat16"
    c.objectives.l_clip = c.objectives.l_ssl = 0.0
    c.data.image_size = c.data.procedural_size = image_size
    c.data.batch_clip = c.data.batch_ssl = c.data.batch_rec = batch
    return c


def export_tokenizer(folder, size=16, text=True):
    """A randomly initialised tiny tokenizer (no DINO head; a text tower if `text`) written as a
    release-format folder: what jobs that read a tokenizer are pointed at."""
    import jax

    from vtp_jax.checkpoints import released
    from vtp_jax.models import vtp

    c = get_config().model
    c.head.prototypes = 0
    if not text:
        c.text.depth = 0
    params = jax.device_get(jax.jit(lambda r: vtp.init_params(c, r, size))(jax.random.key(0)))
    released.export_release(c, params, str(folder), image_size=size)
    return str(folder)


def dit_config(tokenizer, size=16, num_train_images=44, stats_samples=30, steps=4):
    """configs/dit_demo.py at test size: latents of `num_train_images` procedural images by the
    tokenizer folder, parts of 2 batches of 8, a DiT batch of 8 on one device, no evaluators."""
    c = load_config("dit_demo")
    c.dit.update(size="tiny", patch_size=1)  # the tests' 2 x 2 latent grids; compiles in seconds
    c.dit.sample.cfg_scale = 1.0
    c.latents.tokenizer = tokenizer
    c.latents.data.update(image_size=size, procedural_size=size, batch_size=8, num_train_images=num_train_images)
    c.latents.part_batches = 2
    c.latents.stats_samples = stats_samples
    c.dit.batch_size = 8
    c.train.update(steps=steps, log_every=1, checkpoint_every=2, mesh=(1, 1, 1))
    c.evals = {}
    return c


def restore_params(workdir, step, field="params"):
    """A field of a trainer checkpoint's state as host arrays, whatever mesh or process count
    wrote it."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(str(workdir), "checkpoints", str(step), "state")
    meta = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.device_get(ocp.StandardCheckpointer().restore(path, target)[field])
