"""DALL-E tokenizer: architecture, safetensors I/O, pickle conversion, dVAE training, errors for bad files."""

import json
import math
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.tokenizer import (
    DalleDecoder,
    DalleEncoder,
    VisualTokenizer,
    check_tokenizer_compatible,
    load_dalle,
    load_tokenizer,
    map_pixels,
    save_tokenizer,
    unmap_pixels,
)
from engine.tokenizer.convert import convert_dalle_pickles, main
from engine.tokenizer.dvae import DiscreteVAE, gumbel_temperature, kl_to_uniform, kl_weight
from engine.tokenizer.train import TokenizerTrainConfig, save_comparison_grid, train_tokenizer

TINY = dict(group_count=3, n_hid=16, n_blk_per_group=1, vocab_size=64)


@pytest.fixture(autouse=True)
def _one_thread():
    """These small convs run fastest on one thread; several threads on a shared CPU spin-wait 10-30× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_dalle_defaults_match_released_architecture():
    with torch.device("meta"):
        encoder, decoder = DalleEncoder(), DalleDecoder()
    assert round(_count(encoder) / 1e6, 1) == 53.8
    assert round(_count(decoder) / 1e6, 1) == 43.8
    enc = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert enc["blocks.input.w"] == (256, 3, 7, 7)
    assert enc["blocks.group_2.block_1.id_path.w"] == (512, 256, 1, 1)
    assert enc["blocks.group_2.block_1.res_path.conv_1.w"] == (128, 256, 3, 3)
    assert enc["blocks.group_4.block_2.res_path.conv_4.w"] == (2048, 512, 1, 1)
    assert enc["blocks.output.conv.w"] == (8192, 2048, 1, 1) and enc["blocks.output.conv.b"] == (8192,)
    assert "blocks.group_1.block_1.id_path.w" not in enc  # identity when the width does not change
    dec = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert dec["blocks.input.w"] == (128, 8192, 1, 1)
    assert dec["blocks.group_1.block_1.id_path.w"] == (2048, 128, 1, 1)
    assert dec["blocks.group_1.block_1.res_path.conv_1.w"] == (512, 128, 1, 1)
    assert dec["blocks.group_1.block_1.res_path.conv_4.w"] == (2048, 512, 3, 3)
    assert dec["blocks.output.conv.w"] == (6, 256, 1, 1)
    assert encoder.blocks.group_1.block_1.post_gain == 1 / 64
    assert [name for name, _ in encoder.blocks.named_children()] == ["input", "group_1", "group_2", "group_3",
                                                                     "group_4", "output"]


def test_output_shapes_and_tokenizer():
    encoder, decoder = DalleEncoder(**TINY), DalleDecoder(n_init=16, **TINY)
    images = torch.rand(2, 3, 28, 28)
    logits = encoder(map_pixels(images))
    assert logits.shape == (2, 64, 7, 7) and logits.dtype == torch.float32
    assert decoder(logits.softmax(1)).shape == (2, 6, 28, 28)
    tokenizer = VisualTokenizer(encoder, input_size=28).prepare("cpu")
    assert (tokenizer.vocab_size, tokenizer.token_grid, tokenizer.input_size) == (64, (7, 7), 28)
    ids = tokenizer.get_codebook_indices(map_pixels(images))
    assert ids.shape == (2, 49) and ids.dtype == torch.int64
    assert torch.equal(ids, logits.argmax(1).flatten(1))
    assert torch.allclose(tokenizer.get_codebook_probs(map_pixels(images)).sum(1), torch.ones(2, 7, 7))
    with pytest.raises(ValueError, match="second_input_size"):
        tokenizer.get_codebook_indices(torch.rand(2, 3, 32, 32))


def test_map_pixels_round_trip():
    x = torch.rand(4, 3, 8, 8)
    mapped = map_pixels(x)
    assert mapped.min() >= 0.1 and mapped.max() <= 0.9
    torch.testing.assert_close(unmap_pixels(mapped), x)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]  # clamped


def test_safetensors_round_trip(tmp_path):
    encoder, decoder = DalleEncoder(**TINY), DalleDecoder(n_init=16, **TINY)
    save_tokenizer(tmp_path / "tok", encoder, 28, decoder)
    config = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert config["format"] == "beit-engine-tokenizer" and config["kind"] == "dalle_encoder"
    x = map_pixels(torch.rand(2, 3, 28, 28))
    config, encoder2, decoder2 = load_dalle(tmp_path / "tok", with_decoder=True)
    assert config["input_size"] == 28
    torch.testing.assert_close(encoder2(x), encoder(x), rtol=0, atol=0)
    z = torch.rand(1, 64, 7, 7)
    torch.testing.assert_close(decoder2(z), decoder(z), rtol=0, atol=0)
    tokenizer = load_tokenizer(tmp_path / "tok")  # channels_last: another conv algorithm, same result up to rounding
    torch.testing.assert_close(tokenizer.encoder(x), encoder(x), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in tokenizer.parameters()) and not tokenizer.train().training


# A stand-in for the released `dall_e` package, written from its attrs classes: attributes and module tree as in
# openai/DALL-E, only used to *write* a whole-module pickle. It also cross-checks our architecture numerically.
_FAKE_DALL_E = {
    "__init__.py": "",
    "utils.py": """
        import torch, torch.nn as nn, torch.nn.functional as F

        class Conv2d(nn.Module):
            def __init__(self, n_in, n_out, kw, use_float16=True):
                super().__init__()
                self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
                self.device, self.requires_grad = torch.device("cpu"), False
                self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5)
                self.b = nn.Parameter(torch.randn(n_out) * 0.1)

            def forward(self, x):
                return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

        def make_block(block, n_in, n_out, n_layers, kws):
            block.n_in, block.n_out, block.n_layers, block.n_hid = n_in, n_out, n_layers, n_out // 4
            block.post_gain = 1 / n_layers ** 2
            block.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
            sizes = [n_in] + [n_out // 4] * 3 + [n_out]
            block.res_path = nn.Sequential()
            for i, kw in enumerate(kws):
                block.res_path.add_module(f"relu_{i + 1}", nn.ReLU())
                block.res_path.add_module(f"conv_{i + 1}", Conv2d(sizes[i], sizes[i + 1], kw))

        def make_model(model, widths, first, resample, last):
            model.blocks = nn.Sequential()
            model.blocks.add_module("input", first)
            n_in = first.n_out
            for g, width in enumerate(widths):
                group = nn.Sequential()
                for i in range(model.n_blk_per_group):
                    group.add_module(f"block_{i + 1}", model.block_class(n_in, width, 4 * model.n_blk_per_group))
                    n_in = width
                if g < 3:
                    group.add_module(resample[0], resample[1]())
                model.blocks.add_module(f"group_{g + 1}", group)
            model.blocks.add_module("output", nn.Sequential())
            model.blocks.output.add_module("relu", nn.ReLU())
            model.blocks.output.add_module("conv", last)
    """,
    "encoder.py": """
        import torch, torch.nn as nn
        from dall_e.utils import Conv2d, make_block, make_model

        class EncoderBlock(nn.Module):
            def __init__(self, n_in, n_out, n_layers):
                super().__init__()
                make_block(self, n_in, n_out, n_layers, (3, 3, 3, 1))

            def forward(self, x):
                return self.id_path(x) + self.post_gain * self.res_path(x)

        class Encoder(nn.Module):
            block_class = EncoderBlock
            group_count = 4  # a class attribute in DALL-E too (not an attrs field), so it is not pickled

            def __init__(self, n_hid, n_blk_per_group, vocab_size):
                super().__init__()
                self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
                self.input_channels, self.vocab_size = 3, vocab_size
                self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
                make_model(self, [n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid], Conv2d(3, n_hid, 7),
                           ("pool", lambda: nn.MaxPool2d(2)), Conv2d(8 * n_hid, vocab_size, 1, use_float16=False))

            def forward(self, x):
                return self.blocks(x)
    """,
    "decoder.py": """
        import torch, torch.nn as nn
        from dall_e.utils import Conv2d, make_block, make_model

        class DecoderBlock(nn.Module):
            def __init__(self, n_in, n_out, n_layers):
                super().__init__()
                make_block(self, n_in, n_out, n_layers, (1, 3, 3, 3))

            def forward(self, x):
                return self.id_path(x) + self.post_gain * self.res_path(x)

        class Decoder(nn.Module):
            block_class = DecoderBlock
            group_count = 4

            def __init__(self, n_init, n_hid, n_blk_per_group, vocab_size):
                super().__init__()
                self.n_init, self.n_hid, self.n_blk_per_group = n_init, n_hid, n_blk_per_group
                self.output_channels, self.vocab_size = 3, vocab_size
                self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
                make_model(self, [8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid], Conv2d(vocab_size, n_init, 1, False),
                           ("upsample", lambda: nn.Upsample(scale_factor=2, mode="nearest")), Conv2d(n_hid, 6, 1))

            def forward(self, x):
                return self.blocks(x)
    """,
}


@pytest.fixture
def dalle_pickles(tmp_path, monkeypatch):
    """Whole-module pickles of a small fake DALL-E encoder/decoder; the fake package is gone when they are read."""
    package = tmp_path / "fake_src" / "dall_e"
    package.mkdir(parents=True)
    for name, source in _FAKE_DALL_E.items():
        (package / name).write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(package.parent))
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    encoder, decoder = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=32), Decoder(8, 8, 1, 32)
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl")
    torch.save(encoder, tmp_path / "encoder_legacy.pkl", _use_new_zipfile_serialization=False)  # pre-1.6 format
    for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
        del sys.modules[name]
    sys.path.remove(str(package.parent))
    return tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", encoder, decoder


def test_convert_released_pickle_format(dalle_pickles, tmp_path):
    encoder_pkl, decoder_pkl, fake_encoder, fake_decoder = dalle_pickles
    with pytest.raises(ModuleNotFoundError):
        import dall_e  # noqa: F401  (the converter must work without it)
    main([str(encoder_pkl), str(tmp_path / "out"), "--trust-pickle", "--decoder", str(decoder_pkl),
          "--input-size", "16"])
    _, encoder, decoder = load_dalle(tmp_path / "out", with_decoder=True)
    assert encoder.config == dict(group_count=4, n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=32)
    x = map_pixels(torch.rand(2, 3, 16, 16))
    torch.testing.assert_close(encoder(x), fake_encoder(x))
    z = torch.rand(2, 32, 2, 2)
    torch.testing.assert_close(decoder(z), fake_decoder(z))
    assert load_tokenizer(tmp_path / "out").token_grid == (2, 2)


def test_convert_refuses_without_trust_pickle(dalle_pickles, tmp_path, capsys):
    encoder_pkl = dalle_pickles[0]
    with pytest.raises(SystemExit) as exit_info:
        main([str(encoder_pkl), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    not_a_pickle = tmp_path / "wget.log"
    not_a_pickle.write_text("--2021-01-01-- https://cdn.openai.com/dall-e/encoder.pkl\n")
    with pytest.raises(ValueError, match="wget -O"):
        convert_dalle_pickles(not_a_pickle, tmp_path / "out", trust_pickle=True)


def test_schedules():
    assert gumbel_temperature(0, 100) == 1.0
    assert gumbel_temperature(50, 100) == pytest.approx(0.25)  # geometric midpoint of 1 and 1/16
    assert gumbel_temperature(100, 100) == gumbel_temperature(500, 100) == pytest.approx(1 / 16)
    assert [kl_weight(s, 10, 2.0) for s in (0, 5, 10, 20)] == [0.0, 1.0, 2.0, 2.0]
    assert kl_to_uniform(torch.zeros(2, 16, 3, 3)).item() == pytest.approx(0.0, abs=1e-6)
    peaked = torch.full((1, 16, 1, 1), -1e4)
    peaked[0, 3] = 0
    assert kl_to_uniform(peaked).item() == pytest.approx(math.log(16), rel=1e-5)


@pytest.mark.parametrize("recon_loss", ["logit_laplace", "mse"])
def test_training_steps_lower_the_loss(recon_loss):
    arch = dict(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=32)
    vae = DiscreteVAE(DalleEncoder(**arch), DalleDecoder(n_init=8, **arch), recon_loss)
    ramp = torch.linspace(0, 1, 16)
    images = torch.stack([ramp.view(1, 16, 1) * ramp.view(1, 1, 16) ** k + torch.zeros(3, 1, 1) for k in range(4)])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        torch.manual_seed(0)  # the same Gumbel noise every step: the loss only moves because of the updates
        loss = vae(images, temperature=1.0, kl_beta=0.01)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1 * abs(losses[0]), losses
    recon, ids = vae.reconstruct(images)
    assert recon.shape == images.shape and ids.shape == (4, 8, 8)


def test_train_tokenizer_writes_a_loadable_tokenizer(tmp_path):
    cfg = TokenizerTrainConfig(input_size=28, steps=3, batch_size=4, max_train_images=32, eval_images=16, log_every=1,
                               output_dir=str(tmp_path / "run"), num_threads=1, **TINY)
    threads = torch.get_num_threads()
    metrics = train_tokenizer(cfg)
    assert torch.get_num_threads() == threads  # the caller's thread count is back (the demo pretrains next)
    assert {"mse", "psnr", "codebook_used", "perplexity", "train_seconds"} <= metrics.keys()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["token_grid"] == [7, 7]
    assert (tmp_path / "run" / "reconstructions.png").stat().st_size > 0
    tokenizer = load_tokenizer(tmp_path / "run" / "tokenizer")
    check_tokenizer_compatible(tokenizer, vocab_size=64, token_grid=7, input_size=28)


def test_train_tokenizer_on_a_flat_image_folder(tmp_path):
    """A folder of images with no test/ or val/ subfolder: a fixed tenth is held out instead of failing."""
    import numpy as np
    from PIL import Image

    from engine.tokenizer.train import train_and_heldout

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.jpg")
    train_set, held_set = train_and_heldout(str(folder), eval_images=16, seed=0)
    assert len(train_set) == 36 and len(held_set) == 4  # a tenth, capped by eval_images
    assert not set(train_set.indices) & set(held_set.indices)
    assert train_and_heldout(str(folder), 16, 0)[1].indices == held_set.indices  # deterministic
    cfg = TokenizerTrainConfig(data_path=str(folder), input_size=28, steps=2, batch_size=4, eval_images=16,
                               log_every=1, output_dir=str(tmp_path / "run"), num_threads=1, **TINY)
    assert train_tokenizer(cfg)["token_grid"] == [7, 7]
    (tmp_path / "few").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "few" / "one.png")
    with pytest.raises(ValueError, match="too few to hold any out"):
        train_and_heldout(str(tmp_path / "few"), 16, 0)


def test_comparison_grid_layout(tmp_path):
    """reconstructions.png is labelled: a header row names original / reconstruction / tokens."""
    from PIL import Image

    save_comparison_grid(torch.zeros(16, 3, 4, 4), torch.ones(16, 3, 4, 4), tmp_path / "g.png", columns=4, scale=1)
    assert Image.open(tmp_path / "g.png").size == (4 * 2 * 6, 14 + 4 * 6)
    ids = torch.arange(16 * 4).reshape(16, 2, 2)
    save_comparison_grid(torch.zeros(16, 3, 8, 8), torch.ones(16, 3, 8, 8), tmp_path / "t.png", columns=4, scale=4,
                         token_ids=ids)
    grid = np.asarray(Image.open(tmp_path / "t.png"))
    assert grid.shape == (14 + 4 * 40, 4 * 3 * 40, 3)
    assert (grid[:14] < 128).any()  # the header's text
    tokens = grid[14 + 4:14 + 36, 80 + 4:80 + 36]  # the first token map: 2 × 2 cells of distinct colours
    assert len({tuple(tokens[y, x]) for y in (2, 20) for x in (2, 20)}) == 4


def test_clear_errors_for_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*train_tokenizer"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    save_tokenizer(tmp_path / "tok", DalleEncoder(**TINY), 28)
    config_path = tmp_path / "tok" / "tokenizer.json"
    good = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**good, "format": "something-else"}))
    with pytest.raises(ValueError, match="format 'something-else'"):
        load_tokenizer(tmp_path / "tok")
    config_path.write_text(json.dumps({**good, "encoder": {**good["encoder"], "vocab_size": 128}}))
    with pytest.raises(ValueError, match="does not match its tokenizer.json"):
        load_tokenizer(tmp_path / "tok")
    config_path.write_text(json.dumps(good))
    (tmp_path / "tok" / "encoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="encoder.safetensors are missing"):
        load_tokenizer(tmp_path / "tok")


def test_check_tokenizer_compatible():
    tokenizer = VisualTokenizer(DalleEncoder(**TINY), input_size=28)
    check_tokenizer_compatible(tokenizer, vocab_size=64, token_grid=(7, 7), input_size=28)
    with pytest.raises(ValueError, match="vocab size 64 != model vocab_size 8192"):
        check_tokenizer_compatible(tokenizer, vocab_size=8192, token_grid=7, input_size=28)
    with pytest.raises(ValueError, match="token grid"):
        check_tokenizer_compatible(tokenizer, vocab_size=64, token_grid=14, input_size=28)
    with pytest.raises(ValueError, match="second_input_size=28"):
        check_tokenizer_compatible(tokenizer, vocab_size=64, token_grid=7, input_size=56)


class _Payload:
    """What a malicious pickle carries: unpickling it calls `exec` with code of the attacker's choice."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("legacy", [False, True])
def test_convert_never_runs_code_from_a_pickle_even_with_trust_pickle(tmp_path, legacy):
    """Legacy (non-zip) `torch.save` files used to reach plain `pickle.load`; both formats go through the allow-list."""
    marker = tmp_path / "executed"
    torch.save({"encoder": _Payload(marker)}, tmp_path / "evil.pkl", _use_new_zipfile_serialization=not legacy)
    refused = r"exec is not part of a DALL-E dVAE pickle; refusing to load it \(nothing from the file was run"
    with pytest.raises(ValueError, match=refused):
        convert_dalle_pickles(tmp_path / "evil.pkl", tmp_path / "out", trust_pickle=True)
    assert not marker.exists()



def test_convert_reads_legacy_format_dalle_pickles(dalle_pickles, tmp_path):
    """Pickles written before torch's zip format go through the restricted unpickler and still convert."""
    fake_encoder = dalle_pickles[2]
    main([str(tmp_path / "encoder_legacy.pkl"), str(tmp_path / "out"), "--trust-pickle", "--input-size", "16"])
    x = map_pixels(torch.rand(2, 3, 16, 16))
    torch.testing.assert_close(load_dalle(tmp_path / "out")[1](x), fake_encoder(x))


def test_tokenizer_cache_reuses_a_tokenizer_across_output_dirs(tmp_path, monkeypatch):
    import engine.tokenizer.cache as cache

    trained = []
    monkeypatch.setattr(cache, "train_tokenizer", lambda cfg: trained.append(cfg.output_dir) or train_tokenizer(cfg))
    cfg = TokenizerTrainConfig(input_size=28, steps=2, batch_size=4, max_train_images=32, eval_images=16,
                               output_dir=str(tmp_path / "run_a"), num_threads=1, **TINY)
    first = cache.cached_tokenizer(cfg, tmp_path / "cache")
    again = cache.cached_tokenizer(TokenizerTrainConfig(**{**vars(cfg), "output_dir": str(tmp_path / "run_b"),
                                                           "log_every": 7}), tmp_path / "cache")
    assert first == again and len(trained) == 1  # same settings and data, another output dir: reused
    assert (first.parent / "metrics.json").is_file() and load_tokenizer(first).token_grid == (7, 7)
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert left == [first.parent.name, first.parent.name + ".lock"]  # no staging dir left behind
    other = TokenizerTrainConfig(**{**vars(cfg), "steps": 3})
    assert cache.cache_key(other) != cache.cache_key(cfg)  # other settings: another entry


def test_two_runs_needing_the_same_tokenizer_train_it_once(tmp_path, monkeypatch):
    """Two runs (processes) starting together on the same data: one trains, the other waits on the entry's lock
    and reuses it."""
    import multiprocessing
    import os

    import engine.tokenizer.cache as cache

    def slow_train(cfg):
        (tmp_path / f"trained-{os.getpid()}").touch()
        time.sleep(1.0)  # the other run arrives while this one trains
        return train_tokenizer(cfg)

    monkeypatch.setattr(cache, "train_tokenizer", slow_train)  # forked children inherit the patch
    cfg = TokenizerTrainConfig(input_size=28, steps=2, batch_size=4, max_train_images=32, eval_images=16,
                               output_dir=str(tmp_path / "run"), num_threads=1, **TINY)
    context = multiprocessing.get_context("fork")
    runs = [context.Process(target=cache.cached_tokenizer, args=(cfg, tmp_path / "cache")) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=300)
    assert [run.exitcode for run in runs] == [0, 0]
    assert len(list(tmp_path.glob("trained-*"))) == 1
    assert (cache.cached_tokenizer(cfg, tmp_path / "cache") / "tokenizer.json").is_file()


def test_tokenizer_cache_key_follows_the_data(tmp_path):
    import numpy as np
    from PIL import Image

    from engine.tokenizer.cache import cache_key

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        Image.fromarray(np.full((16, 16, 3), i, dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = TokenizerTrainConfig(data_path=str(folder), **TINY)
    key = cache_key(cfg)
    assert cache_key(cfg) == key and cache_key(TokenizerTrainConfig(**TINY)) != key
    time.sleep(0.01)
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / "new.png")
    assert cache_key(cfg) != key  # an added image is new data


@pytest.mark.slow
def test_sigterm_to_the_process_group_during_tokenizer_training_then_rerun_continues_exactly(tmp_path):
    """Issue 12: a signal during tokenizer training (a scheduler's SIGTERM to the whole group) loses at most the
    current step: the state is saved, the run exits with one line, and a rerun ends with the same tokenizer as a run
    that was never stopped."""
    import os
    import signal
    import subprocess

    from conftest import SUBPROCESS_ENV

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "train_tokenizer.py"
    common = ["--steps=240", "--log_every=10", "--batch_size=16", "--eval_images=32", "--max_train_images=512",
              "--group_count=2", "--n_hid=16", "--n_blk_per_group=1", "--vocab_size=64", "--num_threads=1"]
    subprocess.run([sys.executable, str(recipe), *common, f"--output_dir={tmp_path / 'whole'}"], check=True,
                   capture_output=True, env=SUBPROCESS_ENV, timeout=600)
    stopped = tmp_path / "stopped"
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(recipe), *common, f"--output_dir={stopped}"], stdout=log,
                                stderr=log, env=SUBPROCESS_ENV, start_new_session=True)
        deadline = time.time() + 300
        while "step    20 |" not in log_path.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 1
    text = log_path.read_text()
    assert "tokenizer training stopped by SIGTERM after step" in text and "Traceback" not in text
    assert (stopped / "interrupted.pt").is_file() and not (stopped / "metrics.json").exists()
    subprocess.run([sys.executable, str(recipe), *common, f"--output_dir={stopped}"], check=True,
                   capture_output=True, env=SUBPROCESS_ENV, timeout=600)
    assert not (stopped / "interrupted.pt").exists()
    whole, resumed = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", stopped))
    assert resumed["mse"] == whole["mse"] and resumed["perplexity"] == whole["perplexity"]
