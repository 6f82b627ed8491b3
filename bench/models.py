"""The models of the importance rows, at the sizes the exact-layers issue measured them.

Built by hand (torchvision's PyPI wheel does not import beside the CPU torch)
or from transformers configs (random weights, no download). ``build(kind,
quick)`` returns ``(model, batch, output_fn, label)``.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """A ResNet basic block: conv-BN-ReLU(inplace)-conv-BN + shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


def resnet18(width: int = 64, classes: int = 10) -> nn.Module:
    """torchvision's resnet18 layout (7x7 stem, maxpool, 4 stages of 2 basic blocks)."""
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    cin = width
    for mult, stride in ((1, 1), (1, 1), (2, 2), (2, 1), (4, 2), (4, 1), (8, 2), (8, 1)):
        layers.append(BasicBlock(cin, width * mult, stride))
        cin = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def reduced_resnet18(nf: int = 20, classes: int = 10) -> nn.Module:
    """The "reduced ResNet-18" of continual learning (GEM, A-GEM, Mammoth, Avalanche's SlimResNet18): base
    width ``nf`` (20: stages of 20/40/80/160 channels), a 3x3 stride-1 stem and no max-pool (CIFAR 32x32),
    4 stages of 2 basic blocks, 4x4 average pool, a Linear head."""
    layers = [nn.Conv2d(3, nf, 3, 1, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU(inplace=True)]
    cin = nf
    for mult, stride in ((1, 1), (1, 1), (2, 2), (2, 1), (4, 2), (4, 1), (8, 2), (8, 1)):
        layers.append(BasicBlock(cin, nf * mult, stride))
        cin = nf * mult
    layers += [nn.AvgPool2d(4), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def small_cnn(classes: int = 10) -> nn.Module:
    """A small ResNet-style CNN at 32x32: a 3x3 stem of 16 channels, one basic block per stage at 16/32/64
    channels (strides 1, 2, 2), global average pool, a Linear head."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


class TextRNN(nn.Module):
    def __init__(self, cell, vocab: int, dim: int, hidden: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = cell(dim, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 5)

    def forward(self, tokens):
        return self.head(self.rnn(self.emb(tokens))[0][:, -1])


class Encoder(nn.Module):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.enc(x))


def build(kind: str, quick: bool = False):
    g = torch.Generator().manual_seed(0)
    if kind == "resnet18":
        if quick:  # a quarter of the width: the same layers, 1/16 of the parameters
            return resnet18(16), torch.randn(4, 3, 16, 16, generator=g), None, "resnet18 width 16, 4x3x16x16"
        return resnet18(), torch.randn(16, 3, 32, 32, generator=g), None, "resnet18 16x3x32x32"
    if kind == "resnet18-reduced":
        n = 8 if quick else 32
        return (reduced_resnet18(), torch.randn(n, 3, 32, 32, generator=g), None,
                f"reduced ResNet-18 (nf 20), {n}x3x32x32")
    if kind == "cnn-small":
        n = 8 if quick else 16
        return small_cnn(), torch.randn(n, 3, 32, 32, generator=g), None, f"ResNet-style CNN 16/32/64, {n}x3x32x32"
    if kind in ("bert", "gpt2", "bert-tiny", "gpt2-tiny"):
        import transformers

        transformers.logging.set_verbosity_error()
        if kind.endswith("-tiny"):
            kind = kind[:-5]
            layers, dim, n, t = (2, 64, 8, 16) if quick else (2, 64, 16, 32)
        else:
            layers, dim, n, t = (2, 128, 8, 32) if quick else (4, 256, 16, 64)
        ids = torch.randint(0, 1000, (n, t), generator=g)
        if kind == "bert":
            cfg = transformers.BertConfig(num_hidden_layers=layers, hidden_size=dim, num_attention_heads=4,
                                          intermediate_size=4 * dim, vocab_size=1000, max_position_embeddings=128)
            return (transformers.BertModel(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                    lambda o: o.last_hidden_state, f"BERT {layers}x{dim}, {n}x{t} tokens")
        cfg = transformers.GPT2Config(n_layer=layers, n_head=4, n_embd=dim, vocab_size=1000, n_positions=128,
                                      bos_token_id=0, eos_token_id=0)
        return (transformers.GPT2LMHeadModel(cfg), {"input_ids": ids}, lambda o: o.logits,
                f"GPT-2 {layers}x{dim} (tied), {n}x{t} tokens")
    if kind == "vit":
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=128,
                                     num_hidden_layers=2 if quick else 4, num_attention_heads=4,
                                     intermediate_size=512)
        n = 8 if quick else 16
        return (transformers.ViTModel(cfg), {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)},
                lambda o: o.last_hidden_state, f"ViT 32x32/4, {n} images")
    if kind in ("lstm", "gru"):
        n, t = (8, 25) if quick else (16, 50)
        cell = nn.LSTM if kind == "lstm" else nn.GRU
        return (TextRNN(cell, 1000, 64, 128), torch.randint(0, 1000, (n, t), generator=g), None,
                f"{kind.upper()} text 2x128, {n}x{t} tokens")
    if kind == "embedding":
        n = 32
        return (nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 10)), torch.randint(0, 1000, (n, 20), generator=g),
                None, f"Embedding+Linear, {n}x20 tokens")
    if kind == "encoder":
        n, t = (8, 16) if quick else (16, 32)
        return Encoder(128, 2), torch.randn(n, t, 128, generator=g), None, f"TransformerEncoder 2x128, {n}x{t}"
    if kind == "readme":  # the README's first example (its Use section)
        body = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
        return body, torch.randn(32, 20, generator=g), None, "README MLP 20-64-5, batch 32"
    if kind == "mlp-demo":  # the README's main job's model (examples/split_mnist.py) at its estimate() batch size
        body = nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 2))
        return body, torch.randn(256, 784, generator=g), None, "demo MLP 784-400-400-2, batch 256"
    if kind == "mlp":
        return (nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10)),
                torch.randn(64, 784, generator=g), None, "mlp-400 batch 64")
    raise ValueError(f"unknown model {kind!r}")


KINDS = ("resnet18", "bert", "gpt2", "vit", "lstm", "gru", "embedding", "encoder", "mlp", "resnet18-reduced",
         "cnn-small", "gpt2-tiny", "bert-tiny")
