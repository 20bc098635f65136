"""Shared defaults of every training config: D3PO editing configs (Image-Editing Specialists,
paper Sec. 4), the PPO config (InstructRL4Pix) and the supervised / HIVE configs (`hive_*.py`).

Not run directly: each edit's config (e.g. `d3po_snow.py`, `ppo_instructrl4pix.py`) starts from
`get_config()` here and sets what differs. Every key exists here, so a typo in a
`--config.x.y=...` override is an error.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "d3po"                   # d3po (pairs + AI-feedback scores) | ppo (attention-map reward)
                                        # | sft (supervised triples, HIVE reward losses: hive.mode)
    c.seed = 0
    c.workdir = "runs/default"          # checkpoints, logs, image grids
    c.resume = True                     # continue from the newest checkpoint in workdir
    c.distributed = False               # jax.distributed.initialize() first (multi-host: TPU pod, SLURM)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                    # devices on the data axis (-1 = all the others)
    c.mesh.fsdp = 1                     # devices params + optimizer state are sharded over (jaxedit.parallel)
    c.mesh.min_shard_size = 2 ** 14     # smaller leaves (norms, biases, LoRA) stay replicated

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""             # diffusers-format InstructPix2Pix folder; "" = embedded tiny random one
    c.model.dtype = "float32"           # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.style_adapter = True        # 12-channel Specialists model with the style cross-attention adapter
    c.model.adapter_dim = 320
    c.model.adapter_heads = 8
    c.model.remat = "none"              # per-block remat in the backward pass: none | full | dots (less memory)

    c.edit = ml_collections.ConfigDict()
    c.edit.instruction = ""             # e.g. "make it snowy"
    c.edit.segment = "road"             # text prompt of the edit region (Grounded-SAM in the scorer process)
    c.edit.style = ""                   # style name (generated data) / style folder (real data)

    c.data = ml_collections.ConfigDict()
    c.data.instructions = ""            # ppo, sft: MagicBrush split folder (edit_sessions.json), InstructPix2Pix
                                        # folder (seeds.json) or triples .jsonl (sft: with "output"s)
    c.data.images = ""                  # folder or list file of input images
    c.data.masks = ""                   # folder of masks with the same stems ("" = whole frame)
    c.data.styles = ""                  # folder of style images, cycled (the paper uses 5)
    c.data.resolution = 256
    c.data.max_bad_files = 10
    c.data.worker_count = 0
    c.data.generate = 0                 # > 0: write this many generated road scenes to workdir/data and use them
                                        # (ppo: as triples with `scenes.INSTRUCTIONS`; sft: edit triples,
                                        # "make the road white", `scenes.write_edit_triples`)
    c.data.generate_styles = 5

    c.sample = ml_collections.ConfigDict()
    c.sample.steps = 20                 # DDIM steps per trajectory (D3PO default)
    c.sample.eta = 1.0
    c.sample.guidance_text = 7.5
    c.sample.guidance_image = 1.5
    c.sample.guidance_style = 3.0
    c.sample.batch_size = 16            # global images per sampling call (split over devices)

    c.train = ml_collections.ConfigDict()
    c.train.mode = "full"               # full | lora
    c.train.lora_rank = 4
    c.train.lora_alpha = 4.0
    c.train.updates = 40                # the paper uses 15-40 updates
    c.train.samples_per_update = 512    # 256 pairs
    c.train.micro_batch = 8             # pairs (d3po) / samples (ppo) per gradient micro-batch (accumulated)
    c.train.timestep_fraction = 1.0     # fraction of the trajectory's steps trained
    c.train.lr = 3e-5
    c.train.weight_decay = 1e-4
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.max_grad_norm = 1.0
    c.train.beta = 0.1                  # D3PO beta
    c.train.clip_eps = 0.1              # D3PO ratio clip
    c.train.clip_range = 1e-4           # PPO ratio clip (DDPO)
    c.train.adv_clip = 5.0              # PPO advantage clip
    c.train.inner_epochs = 1            # PPO passes over each sampled batch
    c.train.minibatches = 1             # PPO optimizer steps per pass (each over a shuffled 1/minibatches)
    c.train.tracker_buffer = 16         # PPO per-prompt stat tracker: rewards kept per prompt
    c.train.tracker_min_count = 16      # ... needed before a prompt's own statistics are used
    c.train.max_nonfinite = 3           # abort after this many skipped (non-finite) updates in a row

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0                    # held-out scores (heldout/*) before training and every N updates; 0 = off
    c.eval.images = ""                  # held-out inputs (folder or list file); styles from data.styles
    c.eval.instructions = ""            # ppo: held-out instruction data (as data.instructions)
    c.eval.masks = ""
    c.eval.generate = 0                 # > 0: this many generated held-out scenes (another seed than data.generate)

    c.score = ml_collections.ConfigDict()
    c.score.models = ""                 # folder with the paper's scorer weights (see train.PAPER_SCORERS): when set,
                                        # score with depth + Grounded-SAM masks + DreamSim in the scorer process
    c.score.scorer = "simple"           # registered scorer name (or module:attribute)
    c.score.process = False             # score in a separate process over shared memory (PyTorch scorers)
    c.score.address = ""                # connect to a scorer server already listening here ("" = start one)
    c.score.threads = 0                 # torch threads of the scorer process (0 = torch's default)
    c.score.slots = 2                   # shared-memory slots = requests in flight
    c.score.slot_mb = 64                # bytes per slot (one sampling call's images + results)
    c.score.timeout_s = 600.0
    c.score.restart = True              # restart a dead scorer process and resend (False: stop with its error)
    c.score.structural = "depth"        # scorer "specialist": depth | edges (Canny) | sobel
    c.score.depth_weights = ""          # local Depth Anything V2 folder (transformers format); "tiny" = random
    c.score.semantic = "stats"          # scorer "specialist": stats (weight-free) | clip | dinov2 | dreamsim
    c.score.embed_weights = ""          # local CLIP vision / DINOv2 folder (transformers), DreamSim folder; "tiny" = random
    c.score.segment_weights = ""        # "GDINO_DIR,SAM_DIR" (or "tiny"): masks by Grounded-SAM from edit.segment
                                        # in the scorer ("" = the data's masks)
    c.score.segment_style = True        # also mask the style image (f(m_sty * I_sty))
    c.score.segment_fallback = "full"   # no detection: full | empty | error
    c.score.lam = 0.05                  # lambda of the masked pixel L2 term
    c.score.alpha = 1.0                 # weight of the semantic advantage
    c.score.ranking = "sum"             # sum | pareto

    c.hive = ml_collections.ConfigDict()  # sft: supervised training and HIVE (trainers/sft.py, rl/hive.py)
    c.hive.mode = "sft"                 # sft | weighted (w = exp(R/eta), mean 1 over the batch) | condition (5 levels)
    c.hive.eta = 1.0                    # weighted: temperature of exp(R/eta)
    c.hive.dropout = 0.05               # conditioning dropout: this much text only, image only, both
    c.hive.ema_decay = 0.9999           # EMA of the weights (evaluated and saved); 0 = none
    c.hive.ema_warmup = True            # LitEma: decay min(ema_decay, (1+n)/(10+n)) at update n
    c.hive.vae_sample = True            # z_0 from the VAE posterior sample (InstructPix2Pix); False = mode
    c.hive.resize_min = 0               # crop augmentation: resize to s in [resize_min, resize_max] px,
    c.hive.resize_max = 0               # then a data.resolution crop (0 = data.resolution: no crop)
    c.hive.flip_prob = 0.5              # horizontal flips (input, edited image, mask together)
    c.hive.encode_batch = 0             # examples loaded and VAE-encoded per call (0 = train.samples_per_update)
    c.hive.cycle = False                # cycle-consistency augmentation (mode sft): add the reversed triples
    c.hive.cycle_mapping = ""           # user inverse-instruction file (.json {a: b|null} or .tsv a<TAB>b)

    c.reward = ml_collections.ConfigDict()  # ppo: r = cos(a_1, a_2) + alpha * MAE * [MAE > tau]
    c.reward.alpha = -1.0
    c.reward.tau = 0.1                  # MAE threshold on the [0, 1] pixel scale (the paper gives no value)
    c.reward.attention_downsample = 4   # maps of the cross-attention layers at latent/4 (16x16 for 512 px)

    c.log = ml_collections.ConfigDict()
    c.log.every = 1
    c.log.images_every = 5
    c.log.tensorboard = True
    c.log.progress = True               # progress bar on a terminal (never in a log file)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 5
    c.checkpoint.keep = 3
    return c


def edit_config(instruction: str, style: str, *, segment: str = "road", variant: str = "") -> ml_collections.ConfigDict:
    """Config of one paper edit; `variant` "tiny" gives the embedded default (see `tiny`)."""
    c = get_config()
    c.edit.instruction, c.edit.style, c.edit.segment = instruction, style, segment
    c.workdir = f"runs/d3po_{style}" + (f"_{variant}" if variant else "")
    if variant == "tiny":
        tiny(c)
    elif variant:
        raise ValueError(f"unknown config variant {variant!r} (known: tiny)")
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The embedded default: tiny RANDOM checkpoint, generated road scenes, minutes on 2 CPU cores."""
    c.model.checkpoint = ""
    c.model.adapter_dim, c.model.adapter_heads = 16, 2
    c.data.generate, c.data.generate_styles = 32, 5
    c.data.resolution = 64
    c.sample.steps = 6
    c.sample.batch_size = 16
    c.train.updates = 30
    c.train.samples_per_update = 16
    c.train.micro_batch = 8
    c.train.lr = 1e-4
    c.eval.every, c.eval.generate = 5, 16
    c.checkpoint.every = 10
    c.log.images_every = 10
    return c

