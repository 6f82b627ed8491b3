"""Small real models for the importance tests: a ResNet-style CNN, transformers from configs, RNNs.

Built by hand or from configs (no downloads; torchvision's PyPI wheel does not
import beside the CPU torch). Norm layers get random affine parameters and
BatchNorm running statistics, so no gradient is zero by construction (a
LayerNorm with weight 1 and bias 0 at the output makes ``||F(x)||^2``
constant and every gradient before it rounding noise).
"""

from __future__ import annotations

import torch
from torch import nn

from bench.models import BasicBlock as Block


def randomize_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class ResNetish(nn.Module):
    """resnet18's shape at a small width: stem conv + BN + ReLU(inplace) + maxpool, two stages, pool, fc."""

    def __init__(self, width: int = 4, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


class TextLSTM(nn.Module):
    """Embedding + 2-layer LSTM + Linear head on the last step."""

    def __init__(self, vocab: int = 11, dim: int = 6, hidden: int = 5, cell=nn.LSTM, **kw):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.rnn = cell(dim, hidden, num_layers=2, batch_first=True, **kw)
        self.head = nn.Linear(hidden * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, tokens):
        return self.head(self.rnn(self.emb(tokens))[0][:, -1])


class Encoder(nn.Module):
    """nn.TransformerEncoder (post-norm, ReLU) with a Linear head, batch-first or (T, N, E)."""

    def __init__(self, batch_first: bool = True, dim: int = 8):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, 2, 12, dropout=0.1, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, x, src_key_padding_mask=None):
        return self.head(self.enc(x, src_key_padding_mask=src_key_padding_mask))


def gpt2(vocab: int = 40):
    from transformers import GPT2Config, GPT2LMHeadModel

    return randomize_norms(GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=vocab,
                                                      n_positions=16, bos_token_id=0, eos_token_id=0)))


def bert(vocab: int = 40):
    from transformers import BertConfig, BertModel

    return randomize_norms(BertModel(BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                                intermediate_size=20, vocab_size=vocab, max_position_embeddings=16)))


def vit():
    from transformers import ViTConfig, ViTModel

    return randomize_norms(ViTModel(ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                              num_hidden_layers=2, num_attention_heads=2, intermediate_size=20)))
