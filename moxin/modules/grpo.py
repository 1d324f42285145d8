"""GRPO: reinforcement learning from verifiable rewards, on the shared model.

Each training batch is a set of problems. For each, the module samples `group_size` responses with
the inference engine (moxin.generate), scores them (moxin.rewards), and turns the rewards into
group-normalised advantages. It then runs `ppo_epochs` passes over the rollout, each in
`mini_batches` optimizer steps, on the clipped policy objective (moxin.losses.grpo_policy_loss)
with the rollout's own log-probs as the old policy, plus an optional KL penalty to the frozen
starting model (k3 estimator). The objective uses the model's untempered log-probs; rollouts are
sampled at `temperature`.

Optimization is manual (several optimizer steps per batch): `phase.max_steps` counts optimizer
steps, and gradient clipping is `grpo.max_grad_norm` (the Trainer's own clipping stays off).
Under FSDP every rank gathers the whole policy for its rollouts (moxin.parallel.gathered_weights).
Under tensor parallelism a tensor-parallel group samples its rollouts together, in step: its ranks
share the batch and the seed (by data-parallel rank), each computing its heads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from moxin.data.datamodule import data_parallel_rank
from moxin.generate import generate
from moxin.losses import (
    AGGREGATIONS,
    IGNORE_INDEX,
    group_advantages,
    grpo_policy_loss,
    kl_k3,
    token_logps_and_entropy,
)
from moxin.model import Transformer
from moxin.modules.base import MoxinModule
from moxin.modules.reference import ReferencePolicy
from moxin.parallel import from_group_leader, gathered_weights, reshard
from moxin.rewards import REWARDS, MathVerifier, timed_rewards


@dataclass
class GRPOConfig:
    group_size: int = 8  # responses sampled per problem
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 8192
    reward: str = "deepscaler"  # correct | deepscaler | areal | format (moxin.rewards)
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # None: clip_eps (DAPO's clip-higher sets it larger)
    kl_beta: float = 0.001  # 0: no reference model at all
    aggregation: str = "grpo"  # grpo | dapo | dr_grpo (moxin.losses.grpo_policy_loss)
    scale_advantages: bool = True  # divide by the group's std (false: Dr. GRPO)
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass
    max_grad_norm: float | None = 1.0
    reward_timeout_s: float = 1.0
    val_max_new_tokens: int | None = None  # greedy validation answers (None: max_new_tokens)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"grpo.reward must be one of {REWARDS}, got {self.reward!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"grpo.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        for name in ("group_size", "max_new_tokens", "ppo_epochs", "mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError("grpo.group_size must be >= 2: advantages compare responses within a group")
        if self.kl_beta < 0 or self.clip_eps <= 0:
            raise ValueError("grpo.kl_beta must be >= 0 and grpo.clip_eps > 0")


class GRPOModule(ReferencePolicy, MoxinModule):
    data_format = "prompts"
    phase_options = ("grpo",)
    generates = True

    def __init__(self, model_config, optim, nonfinite_loss: str = "stop", grpo: GRPOConfig | None = None):
        super().__init__(model_config, optim, nonfinite_loss=nonfinite_loss)
        self.grpo = grpo or GRPOConfig()
        self.hparams["grpo"] = asdict(self.grpo)
        self.automatic_optimization = False
        self.consumed_batches = 0  # rollout batches trained on (the data position: several steps per batch)
        self.reference: Transformer | None = None
        self._reference_id: str | None = None
        self.verifier = MathVerifier(timeout_s=self.grpo.reward_timeout_s)
        self.tokenizer = None

    def keeps_reference_copy(self) -> bool:
        return self.grpo.kl_beta > 0  # AReaL: no KL, no second model

    def setup(self, stage: str) -> None:
        self.tokenizer = self.trainer.datamodule.tokenizer

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["consumed_batches"] = self.consumed_batches

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.consumed_batches = checkpoint.get("consumed_batches", 0)

    def teardown(self, stage: str) -> None:
        self.verifier.close()

    # --- rollouts ---

    def rollout(self, prompts: list[list[int]], answers: list[str]) -> dict:
        """group_size samples per prompt, scored; padded tensors for the update."""
        g, eos = self.grpo.group_size, self.tokenizer.eos_token_id
        # By data-parallel rank: a tensor-parallel group's ranks draw the same tokens, so they decode in step.
        seed = self.grpo.seed + 1_000_003 * self.global_step + data_parallel_rank(self._trainer)[0]
        started = time.perf_counter()
        with gathered_weights(self.model):  # FSDP: each rank (TP: group) samples to its own lengths
            out = generate(self.model, [p for p in prompts for _ in range(g)], self.grpo.max_new_tokens,
                           temperature=self.grpo.temperature, top_p=self.grpo.top_p, stop=[eos], seed=seed)
        rollout_s = time.perf_counter() - started
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out.tokens]
        # One score per response for a whole tensor-parallel group: its first rank's (a verifier's time limit
        # could decide otherwise on a peer, which would then update the parameters they share differently).
        rewards, correct, reward_s = from_group_leader(
            lambda: timed_rewards(self.grpo.reward, texts, [a for a in answers for _ in range(g)], self.verifier),
            self._meshes[1] if self._meshes else None)
        rewards = torch.tensor(rewards, dtype=torch.float32).view(len(prompts), g)
        advantages = group_advantages(rewards, scale=self.grpo.scale_advantages).view(-1)
        sequences = [prompts[i // g] + out.tokens[i] for i in range(len(out.tokens))]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width - 1), eos, dtype=torch.long)
        labels = torch.full((len(sequences), width - 1), IGNORE_INDEX, dtype=torch.long)
        old_logps = torch.zeros(len(sequences), width - 1)
        for row, sequence in enumerate(sequences):
            start = len(prompts[row // g]) - 1  # the position that predicts the first response token
            input_ids[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
            labels[row, start:len(sequence) - 1] = torch.tensor(out.tokens[row])
            old_logps[row, start:len(sequence) - 1] = torch.tensor(out.logprobs[row])
        batch = {"input_ids": input_ids.to(self.device), "labels": labels.to(self.device),
                 "old_logps": old_logps.to(self.device), "advantages": advantages.to(self.device)}
        if self.reference is not None:
            with torch.no_grad():
                hidden = self.reference.hidden_states(batch["input_ids"])
                batch["reference_logps"] = token_logps_and_entropy(hidden, self.reference.output.weight,
                                                                   batch["labels"], entropy_rows=0)[0]
            reshard(self.reference)  # FSDP: no backward frees what its forward gathered; free it now
        lengths = torch.tensor([len(t) for t in out.tokens], dtype=torch.float32)
        stats = {"reward": rewards.mean(), "reward_std": rewards.std(dim=-1, unbiased=False).mean(),
                 "accuracy": torch.tensor(correct, dtype=torch.float32).mean(), "response_length": lengths.mean(),
                 "rollout_s": torch.tensor(rollout_s), "reward_s": torch.tensor(reward_s)}
        return {"batch": batch, "stats": stats, "texts": texts}

    # --- the update ---

    def policy_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.model.hidden_states(batch["input_ids"])
        logps, entropy = token_logps_and_entropy(hidden, self.model.output.weight, batch["labels"])
        mask = batch["labels"] != IGNORE_INDEX
        kl = kl_k3(logps, batch["reference_logps"]) if "reference_logps" in batch else None
        loss, stats = grpo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask,
                                       clip_low=self.grpo.clip_eps, clip_high=self.grpo.clip_eps_high,
                                       aggregation=self.grpo.aggregation, kl=kl, kl_beta=self.grpo.kl_beta,
                                       max_tokens=self.grpo.max_new_tokens)
        stats["entropy"] = entropy
        return loss, stats

    def training_step(self, batch: dict, batch_idx: int) -> None:
        rollout = self.rollout(batch["prompt_ids"], batch["answers"])
        data, n = rollout["batch"], rollout["batch"]["input_ids"].shape[0]
        if n % self.grpo.mini_batches:
            raise ValueError(f"{n} rollout rows (problems x group_size) do not split into grpo.mini_batches="
                             f"{self.grpo.mini_batches} equal optimizer steps")
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        started = time.perf_counter()
        update_stats: dict[str, list] = {}
        for _ in range(self.grpo.ppo_epochs):
            for rows in torch.arange(n).tensor_split(self.grpo.mini_batches):
                loss, stats = self.policy_loss({k: v[rows] for k, v in data.items()})
                if self.nonfinite(loss):  # policy skip: this optimizer step is dropped, and counted
                    self.drop_step(optimizer, scheduler)
                    continue
                self.manual_backward(loss)
                if self.grpo.max_grad_norm:  # (tensor parallelism: one norm over both meshes)
                    self.configure_gradient_clipping(optimizer, self.grpo.max_grad_norm, "norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                for name, value in {"loss": loss.detach(), **stats}.items():
                    update_stats.setdefault(name, []).append(value.detach())
        self.consumed_batches += 1
        self.tokens_seen += int((data["labels"] != IGNORE_INDEX).sum()) * self.data_parallel_size
        metrics = {**rollout["stats"], "update_s": torch.tensor(time.perf_counter() - started),
                   **{k: torch.stack(v).mean() for k, v in update_stats.items()}}
        metrics.update({f"reward_{k}": torch.tensor(float(v)) for k, v in self.verifier.stats.take().items() if v})
        self.log("train/reward", metrics.pop("reward"), on_step=True, prog_bar=True)
        self.log_dict({f"train/{k}": v.float() for k, v in metrics.items()}, on_step=True)
        self.log("train/tokens", float(self.tokens_seen), on_step=True)
        self.log_lr()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Greedy answers to held-out problems: accuracy and reward."""
        with gathered_weights(self.model):
            out = generate(self.model, batch["prompt_ids"],
                           self.grpo.val_max_new_tokens or self.grpo.max_new_tokens, stop=[self.tokenizer.eos_token_id])
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out.tokens]
        rewards, correct, _ = timed_rewards(self.grpo.reward, texts, batch["answers"], self.verifier)
        size = len(texts)
        self.log("val/accuracy", sum(correct) / size, prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/reward", sum(rewards) / size, sync_dist=True, batch_size=size)
        self.log("val/response_length", sum(len(t) for t in out.tokens) / size, sync_dist=True, batch_size=size)
