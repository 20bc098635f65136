"""HIVE's reward model R(I_in, instruction, I_edit) -> scalar (HIVE appendix B.2, Fig. 3).

    tokens = [vit(I_in) + e_0 ; vit(I_edit) + e_1]            (concatenated along the sequence)
    h      = text_encoder(instruction, cross-attending to tokens)
    R      = w . h[first token] + b

- vit: BLIP's vision transformer (`BlipVisionModel`, last hidden state after its final layer norm),
  the same one for both images. text_encoder: BLIP's image-grounded text encoder (`BlipTextModel`,
  BERT with a cross-attention layer between self-attention and feed-forward in every block),
  bidirectional, read on its first token ([CLS]; or BLIP's [ENC], see `first_token`). One linear
  head to a scalar. Initialised from BLIP's image-text matching model (`from_blip`).
- e_0, e_1 ("which image" embedding, ``image_type_embedding=True``): a learned vector added to
  every token of the input (e_0) and of the edited image (e_1), ZERO-initialised. The paper only
  says the two embeddings are concatenated; but cross-attention ignores the order of its keys and
  both images carry the same position embeddings, so without it R(a, c, b) = R(b, c, a) exactly
  and "add a dog" could not be told from "remove the dog". Zero-initialised, the model starts as
  the paper's; ``image_type_embedding=False`` gives the paper's exactly.
- Trainable: the paper fine-tunes only "the encoders' final layer" (appendix B.2, last paragraph
  of "Human Feedback Rewards Learning"): by default the last text-encoder layer and the last
  vision layer (with its final layer norm), plus the head and e_0/e_1. ``train_text_layers`` /
  ``train_vision_layers`` choose how many final layers (0 freezes the encoder).
- Pre-processing (= `transformers.BlipImageProcessorPil`): uint8 RGB resized to image_size x
  image_size with PIL bicubic (aspect not kept, no crop; PIL antialiases when shrinking), /255,
  normalised with the OpenAI CLIP mean/std.
- Loss: `bradley_terry_loss`, -log sigma(R_better - R_worse) averaged over all ordered pairs.

Files (`save`/`load`): ``config.json`` (vision/text configs, options, trainable parameter
names), ``model.safetensors``, ``tokenizer/``. `RewardScorer` adapts the model to the scorer
interface. PyTorch: imported only in the scorer process (and `python -m jaxedit.reward_model`).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from jaxedit.scorers.base import check_batch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / _STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FORMAT = "jaxedit-hive-reward-model"


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3), PIL bicubic (as BlipImageProcessorPil)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S): /255, CLIP mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def preprocess(images, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) (or a list of differently sized HWC images) -> pixel values (B, 3, size, size)."""
    return normalize(np.stack([resize(np.asarray(im, np.uint8), size) for im in images]))


def bradley_terry_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """mean over all ordered pairs (i better than j: ranks[n, i] < ranks[n, j]) of
    -log sigma(rewards[n, i] - rewards[n, j]). rewards (N, K) float, ranks (N, K) int, 1 = best;
    ties give no pair; a rank < 1 marks padding (rankings with fewer than K edits). Every pair of
    the batch weighs the same; 0 (with a gradient of 0) when there is no pair."""
    ranks = torch.as_tensor(ranks, device=rewards.device)
    ri, rj = ranks[:, :, None], ranks[:, None, :]
    valid = (ri >= 1) & (rj >= 1) & (ri < rj)
    losses = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])
    return torch.where(valid, losses, 0.0).sum() / valid.sum().clamp(min=1)


# ---- tiny random model (tests, `--init tiny`) ----

TINY_WORDS = ("add remove make change turn replace put the a an of to in on into it its is and with more less "
              "red green blue yellow white black orange purple pink brown gray color colour square circle "
              "sky car dog cat tree house water snow night day sunset winter summer photo image picture").split()


def tiny_tokenizer() -> BertTokenizer:
    """A BERT WordPiece tokenizer over a small vocabulary written here: BERT's special tokens, some
    editing words, single characters and their '##' continuations (so any ASCII text tokenises)."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(".,!?'\"-:;()") + chars
    vocab += [w for w in TINY_WORDS if w not in vocab] + ["##" + c for c in chars]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


def tiny_configs(vocab_size: int, image_size: int = 32, patch_size: int = 8) -> tuple[BlipVisionConfig, BlipTextConfig]:
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, initializer_range=0.02)
    text = BlipTextConfig(vocab_size=vocab_size, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                          bos_token_id=2, eos_token_id=3, sep_token_id=3, pad_token_id=0)
    return vision, text


class EditRewardModel(nn.Module):
    """R(I_in, instruction, I_edit) -> scalar (see the module docstring). Higher is better."""

    def __init__(self, vision: BlipVisionModel, text: BlipTextModel, tokenizer, *, train_text_layers: int = 1,
                 train_vision_layers: int = 1, image_type_embedding: bool = True, first_token: str | None = None,
                 max_text_len: int = 35):
        super().__init__()
        if not text.config.is_decoder:
            raise ValueError("the text encoder needs cross-attention layers (text_config.is_decoder=True)")
        if text.config.encoder_hidden_size != vision.config.hidden_size:
            raise ValueError(f"text encoder_hidden_size {text.config.encoder_hidden_size} != vision hidden_size "
                             f"{vision.config.hidden_size}")
        self.vision, self.text, self.tokenizer = vision, text, tokenizer
        self.image_type = nn.Parameter(torch.zeros(2, vision.config.hidden_size)) if image_type_embedding else None
        self.head = nn.Linear(text.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if first_token is not None and tokenizer.convert_tokens_to_ids(first_token) == tokenizer.unk_token_id:
            raise ValueError(f"first_token {first_token!r} is not in the tokenizer's vocabulary")
        self.first_token, self.max_text_len = first_token, max_text_len
        self.train_text_layers, self.train_vision_layers = train_text_layers, train_vision_layers
        self.set_trainable(train_text_layers, train_vision_layers)

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def options(self) -> dict:
        return {"train_text_layers": self.train_text_layers, "train_vision_layers": self.train_vision_layers,
                "image_type_embedding": self.image_type is not None, "first_token": self.first_token,
                "max_text_len": self.max_text_len}

    # ---- which parameters train ----

    def set_trainable(self, text_layers: int, vision_layers: int) -> None:
        """Trains the last `text_layers` text-encoder layers, the last `vision_layers` vision layers
        (and the vision's final layer norm when > 0), the head and the image-type embedding."""
        n_text, n_vision = len(self.text.encoder.layer), len(self.vision.encoder.layers)
        if not (0 <= text_layers <= n_text and 0 <= vision_layers <= n_vision):
            raise ValueError(f"trainable layers: text {text_layers} of {n_text}, vision {vision_layers} of {n_vision}")
        self.train_text_layers, self.train_vision_layers = text_layers, vision_layers
        prefixes = ["head.", "image_type"] + [f"text.encoder.layer.{i}." for i in range(n_text - text_layers, n_text)]
        prefixes += [f"vision.encoder.layers.{i}." for i in range(n_vision - vision_layers, n_vision)]
        prefixes += ["vision.post_layernorm."] if vision_layers else []
        for name, p in self.named_parameters():
            p.requires_grad_(any(name.startswith(q) for q in prefixes))

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ---- forward ----

    def tokenize(self, instructions) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tokenizer(list(instructions), padding="longest", truncation=True, max_length=self.max_text_len,
                           return_tensors="pt")
        ids = t["input_ids"].clone()
        if self.first_token is not None:  # BLIP's ITM replaces [CLS] with [ENC]
            ids[:, 0] = self.tokenizer.convert_tokens_to_ids(self.first_token)
        return ids, t["attention_mask"]

    def forward(self, input_pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                edit_pixels: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (M,) of M edits. input_pixels (N, 3, S, S) and the instruction tokens (N, L) describe
        N rankings; edit_pixels (M, 3, S, S); edit m belongs to ranking group[m] (default: m), so an
        input shared by several edits is encoded once."""
        dev = self.head.weight.device
        v_in = self.vision(pixel_values=input_pixels.to(dev)).last_hidden_state
        v_ed = self.vision(pixel_values=edit_pixels.to(dev)).last_hidden_state
        group = torch.arange(len(v_ed), device=dev) if group is None else torch.as_tensor(group, device=dev)
        if self.image_type is not None:
            v_in, v_ed = v_in + self.image_type[0], v_ed + self.image_type[1]
        tokens = torch.cat([v_in[group], v_ed], dim=1)
        h = self.text(input_ids=input_ids.to(dev)[group], attention_mask=attention_mask.to(dev)[group],
                      encoder_hidden_states=tokens).last_hidden_state
        return self.head(h[:, 0]).squeeze(-1)

    @torch.inference_mode()
    def score(self, inputs, instructions, edits, batch_size: int = 16) -> np.ndarray:
        """R for B triplets: inputs, edits uint8 (B, H, W, 3) (or lists of HWC images), B instructions
        -> float32 (B,). Higher is better."""
        was_training = self.training
        self.eval()
        out = []
        for i in range(0, len(edits), batch_size):
            ids, mask = self.tokenize(instructions[i:i + batch_size])
            out.append(self(preprocess(inputs[i:i + batch_size], self.image_size), ids, mask,
                            preprocess(edits[i:i + batch_size], self.image_size)).float().cpu().numpy())
        self.train(was_training)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0,), np.float32)

    # ---- construction, files ----

    @classmethod
    def from_configs(cls, vision_config: BlipVisionConfig, text_config: BlipTextConfig, tokenizer, seed: int = 0,
                     **options) -> "EditRewardModel":
        torch.manual_seed(seed)
        text_config.is_decoder = True
        return cls(BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False), tokenizer,
                   **options)

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int = 32, patch_size: int = 8, **options) -> "EditRewardModel":
        """A 56 K-parameter random model (width 32, 2 + 2 layers, 32 px, patch 8) with `tiny_tokenizer`."""
        tok = tiny_tokenizer()
        return cls.from_configs(*tiny_configs(len(tok), image_size, patch_size), tok, seed=seed, **options)

    @classmethod
    def from_blip(cls, path: str, seed: int = 0, **options) -> "EditRewardModel":
        """From a local transformers `BlipForImageTextRetrieval` folder (e.g. a download of
        Salesforce/blip-itm-base-coco): its vision_model and text_encoder, and the folder's
        tokenizer; the head (seeded) and the image-type embedding are new. If the tokenizer knows
        BLIP's [ENC] token, it replaces [CLS] as the first token, as BLIP's image-text matching does."""
        from transformers import BlipForImageTextRetrieval
        itm = BlipForImageTextRetrieval.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        if "first_token" not in options and tok.convert_tokens_to_ids("[ENC]") not in (None, tok.unk_token_id):
            options["first_token"] = "[ENC]"
        torch.manual_seed(seed)
        return cls(itm.vision_model, itm.text_encoder, tok, **options)

    def save(self, path: str, extra: dict | None = None) -> None:
        """Writes config.json, model.safetensors and tokenizer/ (each file replaced atomically)."""
        os.makedirs(path, exist_ok=True)
        config = {"format": FORMAT, "version": 1, "vision_config": self.vision.config.to_dict(),
                  "text_config": self.text.config.to_dict(), **self.options(), "trainable": self.trainable_names(),
                  **(extra or {})}
        self.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        tmp = os.path.join(path, ".partial-model.safetensors")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, ".partial-config.json"), "w") as f:
            json.dump(config, f, indent=1)
        os.replace(os.path.join(path, ".partial-config.json"), os.path.join(path, "config.json"))

    @staticmethod
    def read_config(path: str) -> dict | None:
        """The reward model's config.json in `path`, or None if `path` holds no saved reward model."""
        try:
            with open(os.path.join(path, "config.json")) as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
        return config if isinstance(config, dict) and config.get("format") == FORMAT else None

    @classmethod
    def load(cls, path: str, device: str = "cpu") -> "EditRewardModel":
        config = cls.read_config(path)
        if config is None:
            raise ValueError(f"{path}: no saved reward model (config.json with format {FORMAT!r})")
        options = {k: config[k] for k in ("train_text_layers", "train_vision_layers", "image_type_embedding",
                                          "first_token", "max_text_len")}
        model = cls.from_configs(BlipVisionConfig.from_dict(config["vision_config"]),
                                 BlipTextConfig.from_dict(config["text_config"]),
                                 AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer")), **options)
        model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
        return model.to(device)


class RewardScorer:
    """HIVE reward as a score: {"reward": -R} (float32 (B,), lower is better).

    The scorer interface carries no instruction, so the instruction is fixed here (``instruction``)
    for every sample; the trainer's per-sample instruction would need a new scorer argument."""
    names = ("reward",)

    def __init__(self, model: EditRewardModel, instruction: str, *, batch_size: int = 16, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.instruction, self.batch_size = str(instruction), batch_size

    def __call__(self, inputs, generated, styles, masks) -> dict[str, np.ndarray]:
        inputs, generated, _, _ = check_batch(inputs, generated, styles, masks)
        r = self.model.score(inputs, [self.instruction] * len(inputs), generated, batch_size=self.batch_size)
        return {"reward": (-r).astype(np.float32)}


def reward_scorer(model: str = "tiny", *, instruction: str, **kwargs) -> RewardScorer:
    """Factory for `make_scorer("jaxedit.scorers.reward_model:reward_scorer", model=DIR, instruction=...)`;
    ``model="tiny"`` builds the tiny random model."""
    return RewardScorer(EditRewardModel.tiny() if model == "tiny" else EditRewardModel.load(model),
                        instruction, **kwargs)
