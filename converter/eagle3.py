"""An EAGLE-3 draft head for a converted model, in the layout vLLM serves as `eagle3`
(`LlamaForCausalLMEagle3`: `fc`, one decoder layer `midlayer`, `norm`, `lm_head`).

The head drafts token t+2 from the target's residual stream at position t (three layers,
concatenated and projected by `fc`) and the embedding of token t+1; each further draft
feeds the head's own pre-norm output back in place of the target's states, one position
on. vLLM's proposer runs it that way: a first pass over the verified tokens with the
target's states (its keys and values stay in the draft's cache), then one token per
draft. `Eagle3Head.forward` trains exactly that computation for `steps` drafts at every
position at once (EAGLE-3's training-time test): the draft at step j attends to the
first pass's keys up to its position and to the keys its earlier steps wrote there.

The embeddings are the target's (not saved: vLLM shares the target's); `lm_head` starts
from the target's and is trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .modeling import JetNemotronMLP, RMSNorm, rotary_qkv

KeysValues = tuple[torch.Tensor, torch.Tensor]  # each [B, kv_heads, N, head_dim]


def default_aux_layers(num_layers: int) -> list[int]:
    """vLLM's default for EAGLE-3 (2, L/2, L-3) where those are three distinct layers;
    otherwise the first layer's output, the middle and the last layer's input."""
    layers = [2, num_layers // 2, num_layers - 3]
    if len(set(layers)) == 3 and min(layers) >= 0:
        return layers
    return [1, num_layers // 2, num_layers - 1]


def aux_layers_problem(aux_layers: list[int], num_layers: int) -> str | None:
    """What is wrong with `aux_layers` for a target of `num_layers` layers, or None."""
    if len(set(aux_layers)) != 3 or not all(0 <= i <= num_layers for i in aux_layers):
        return (f"{aux_layers}: expected three distinct residual-stream indices in [0, {num_layers}] "
                f"(0: the embeddings, {num_layers}: the last layer's output)")
    return None


class Eagle3Attention(nn.Module):
    """GQA attention with RoPE whose projections read [embedding, hidden] (2 x hidden)."""

    def __init__(self, config: dict):
        super().__init__()
        h = config["hidden_size"]
        self.num_heads, self.num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim, self.rope_theta = config["head_dim"], config["rope_theta"]
        self.q_proj = nn.Linear(2 * h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, first_pass: KeysValues | None,
                earlier_steps: tuple[KeysValues, ...]) -> tuple[torch.Tensor, KeysValues]:
        """x `[B, N, 2h]`, positions `[N]`. Without `first_pass` this is the first pass:
        causal attention over its own keys. With it (M >= N positions), query n is a later
        draft step: it attends to the first pass's keys up to its position (the last N are
        the queries' positions) and to the keys `earlier_steps` and itself wrote there."""
        B, N, _ = x.shape
        q, k, v = rotary_qkv(self, x, positions)  # [B, heads or kv_heads, N, head_dim]
        groups = self.num_heads // self.num_kv_heads

        def all_heads(t: torch.Tensor) -> torch.Tensor:  # [B, kv_heads, M, D] -> [B, heads, M, D]
            return t.repeat_interleave(groups, dim=1)

        causal_k, causal_v = (k, v) if first_pass is None else first_pass
        same_position = () if first_pass is None else (*earlier_steps, (k, v))
        M = causal_k.shape[2]
        scale = self.head_dim ** -0.5
        scores = q @ all_heads(causal_k).transpose(-1, -2) * scale  # [B, heads, N, M]
        visible = torch.ones(N, M, dtype=torch.bool, device=x.device).tril(M - N)
        scores = scores.masked_fill(~visible, float("-inf"))
        # one more score per query for each same-position key: [B, heads, N, M + steps]
        scores = torch.cat([scores, *((q * all_heads(key)).sum(-1, keepdim=True) * scale
                                      for key, _ in same_position)], dim=-1)
        probs = scores.float().softmax(-1).to(q.dtype)
        out = probs[..., :M] @ all_heads(causal_v)
        for i, (_, value) in enumerate(same_position):
            out = out + probs[..., M + i, None] * all_heads(value)
        # [B, heads, N, head_dim] -> [B, N, heads * head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(B, N, -1)), (k, v)


class Eagle3Layer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        h, eps = config["hidden_size"], config["rms_norm_eps"]
        self.input_layernorm = RMSNorm(h, eps)
        self.hidden_norm = RMSNorm(h, eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = JetNemotronMLP(SimpleNamespace(hidden_size=h, intermediate_size=config["intermediate_size"]))

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                first_pass: KeysValues | None, earlier_steps: tuple[KeysValues, ...]
                ) -> tuple[torch.Tensor, KeysValues]:
        """The pre-norm output `[B, N, h]` and this pass's keys and values."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # [B, N, 2h]
        attended, kv = self.self_attn(x, positions, first_pass, earlier_steps)
        residual = hidden + attended
        return residual + self.mlp(self.post_attention_layernorm(residual)), kv


class Eagle3Head(nn.Module):
    """The draft head; its state dict names are the checkpoint's (vLLM's `eagle3` format)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        h = config["hidden_size"]
        self.fc = nn.Linear(len(config["eagle_aux_hidden_state_layer_ids"]) * h, h, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = RMSNorm(h, config["rms_norm_eps"])
        self.lm_head = nn.Linear(h, config["vocab_size"], bias=False)

    @property
    def aux_layers(self) -> list[int]:
        return self.config["eagle_aux_hidden_state_layer_ids"]

    @classmethod
    def for_target(cls, target: nn.Module, aux_layers: list[int], seed: int) -> Eagle3Head:
        """A head shaped like one attention layer of `target` (a reference
        `JetNemotronForCausalLM`): weights normal(0, initializer_range), `fc` the identity
        on the deepest aux layer, `lm_head` the target's."""
        c = target.config
        problem = aux_layers_problem(aux_layers, c.num_hidden_layers)
        if problem:
            raise ValueError(f"aux_layers {problem}")
        config = {
            "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": 1,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "vocab_size": c.vocab_size, "draft_vocab_size": c.vocab_size,
            "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
            "rope_theta": c.rope_parameters["rope_theta"], "hidden_act": "silu", "attention_bias": False,
            "tie_word_embeddings": False, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
            "eagle_aux_hidden_state_layer_ids": sorted(aux_layers),
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = cls(config)
            with torch.no_grad():
                for p in head.parameters():
                    if p.dim() == 2:
                        p.normal_(0.0, c.initializer_range)
                h = c.hidden_size
                head.fc.weight.zero_()
                head.fc.weight[:, 2 * h:] = torch.eye(h)
                head.lm_head.weight.copy_(target.lm_head.weight)
        return head

    def logits(self, prenorm: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(prenorm)).float()

    def forward(self, token_embeds: torch.Tensor, aux: torch.Tensor, steps: int) -> torch.Tensor:
        """Draft logits `[B, steps, T - steps, vocab]`: at step j, index t holds the
        prediction of token t + j + 2 from the target's states `aux` `[B, T, 3h]` up to t
        and the (teacher-forced) tokens up to t + j + 1, whose embeddings are
        `token_embeds` `[B, T, h]`: what vLLM drafts when the first j drafts were right."""
        n = token_embeds.shape[1] - steps
        positions = torch.arange(n, device=aux.device)
        hidden = self.fc(aux[:, :n])
        first_pass, earlier, logits = None, [], []
        for j in range(steps):
            hidden, kv = self.midlayer(token_embeds[:, 1 + j:1 + j + n], hidden, positions + j,
                                       first_pass, tuple(earlier))
            if first_pass is None:
                first_pass = kv
            else:
                earlier.append(kv)
            logits.append(self.logits(hidden))
        return torch.stack(logits, dim=1)


def aux_states(target: nn.Module, input_ids: torch.Tensor, layers: list[int]):
    """The target's output on `input_ids` and its residual stream at `layers`,
    concatenated `[B, T, len(layers) * h]` (what vLLM hands the head)."""
    out = target(input_ids=input_ids, output_hidden_states=True)
    return out, torch.cat([out.hidden_states[i] for i in layers], dim=-1)


class TargetPass:
    """One frozen-target forward per training batch, giving both the distillation targets
    (`logits`, called first by `run_training`) and the head's inputs (`inputs`)."""

    def __init__(self, target: nn.Module, aux_layers: list[int], steps: int):
        self.target, self.aux_layers, self.steps = target, aux_layers, steps
        self._batch = None

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The target's next-token logits aligned with `Eagle3Head.forward`'s output."""
        out, aux = aux_states(self.target, input_ids, self.aux_layers)
        self._batch = (input_ids, self.target.model.embed_tokens(input_ids), aux)
        n = input_ids.shape[1] - self.steps
        return torch.stack([out.logits[:, 1 + j:1 + j + n] for j in range(self.steps)], dim=1)

    def inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, embeds, aux = self._batch
        if ids is not input_ids:
            raise RuntimeError("TargetPass.inputs called for a batch `logits` did not see")
        return embeds, aux


@torch.no_grad()
def speculative_greedy(target: nn.Module, head: Eagle3Head, prompt: list[int], new_tokens: int,
                       steps: int) -> tuple[list[int], int, int]:
    """Greedy speculative decoding of `new_tokens` after `prompt` as vLLM runs it with this
    head and `steps` drafts per verification: (the tokens, verifications, accepted drafts)."""
    device = next(target.parameters()).device
    extra = new_tokens + steps  # the greedy continuation, and the last drafts' targets
    ids = target.generate(torch.tensor([prompt], device=device), max_new_tokens=extra, min_new_tokens=extra,
                          do_sample=False)
    sequence = ids[0].tolist()
    _, aux = aux_states(target, ids, head.aux_layers)
    embed = target.model.embed_tokens
    n = len(sequence) - 1
    positions = torch.arange(n, device=device)
    # the first pass over every position with the target's states
    prenorm, first_pass = head.midlayer(embed(ids[:, 1:]), head.fc(aux[:, :n]), positions, None, ())
    first_logits = head.logits(prenorm)
    last, emitted, verifications, accepted = len(prompt) - 1, 1, 0, 0
    while emitted < new_tokens:
        drafts = [int(first_logits[0, last].argmax())]
        hidden, earlier = prenorm[:, last:last + 1], []
        for j in range(1, steps):
            hidden, kv = head.midlayer(embed(torch.tensor([[drafts[-1]]], device=device)), hidden,
                                       torch.tensor([last + j], device=device),
                                       tuple(t[:, :, :last + 1] for t in first_pass), tuple(earlier))
            earlier.append(kv)
            drafts.append(int(head.logits(hidden)[0, 0].argmax()))
        right = 0
        while right < steps and drafts[right] == sequence[last + 2 + right]:
            right += 1
        verifications, accepted = verifications + 1, accepted + right
        emitted += right + 1
        last += right + 1
    return sequence[len(prompt):len(prompt) + new_tokens], verifications, accepted


def save_eagle3_folder(saved: dict, folder: Path, dtype: torch.dtype) -> None:
    """A saved head (`{config, state_dict}`) as vLLM's `eagle3` model folder: config.json
    and model.safetensors (the tokenizer is the caller's)."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({name: t.to(dtype).contiguous() for name, t in saved["state_dict"].items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    config = {**saved["config"], "torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_eagle3_folder(folder: Path) -> Eagle3Head:
    """The head of an `eagle3` folder, in float32."""
    from safetensors.torch import load_file

    head = Eagle3Head(json.loads((Path(folder) / "config.json").read_text()))
    head.load_state_dict(load_file(Path(folder) / "model.safetensors"))
    return head.float().eval()
