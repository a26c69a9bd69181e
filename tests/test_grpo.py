"""GRPO, RLOO and REINFORCE++ on tiny random models, reward sources (function, HTTP server),
the stage registry and configs of the on-policy stages."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import ConfigError, GRPOConfig, PPOConfig, ReinforceConfig, RLOOConfig, load_stage_config
from rlhf.rewards import FunctionReward, HttpReward, RewardError, RewardSources
from rlhf.trainers.algorithms import GRPOTrainer, ReinforceTrainer, RLOOTrainer
from test_distributed import run_two_ranks
from test_ppo import metrics, models  # noqa: F401  (the tiny policy and reward model)

REWARD_PY = '''
def score(prompts, responses, answer):
    assert len(answer) == len(prompts) and all(a is not None for a in answer)
    # longer responses that contain the answer's first letter score more
    return [len(r) / 10 + (a[0] in r) for r, a in zip(responses, answer)]

def boom(prompts, responses, **fields):
    raise KeyError("no such thing")

def short(prompts, responses, **fields):
    return [1.0] * (len(prompts) - 1)
'''


@pytest.fixture(scope="module")
def prompts_with_answers(tmp_path_factory, task_dir):
    """The task's prompts with an `answer` field each, and a reward function file."""
    d = tmp_path_factory.mktemp("grpo_data")
    for split in ("train", "eval"):
        rows = [json.loads(x) for x in (task_dir / f"prompts_{split}.jsonl").read_text().splitlines()]
        rows = rows[:64 if split == "train" else 16]
        with (d / f"{split}.jsonl").open("w") as f:
            for i, r in enumerate(rows):
                f.write(json.dumps({**r, "answer": "abcdefgh"[i % 8]}) + "\n")
    (d / "reward.py").write_text(REWARD_PY)
    return d


def overrides(out, models, data, *extra, stage="grpo"):
    return [f"output_dir={out}", f"policy.model.path={models / 'policy'}", f"data.path={data / 'train.jsonl'}",
            f"data.eval.path={data / 'eval.jsonl'}", "rollout.batch_size=8",
            "rollout.n=4", "rollout.max_new_tokens=12", "train.global_batch_size=16", "train.micro_batch_size=8",
            "train.max_steps=3", f"{stage}.epochs=2", "policy.optim.lr=1e-3", "logging.progress_bar=false",
            "sample_every=1", *extra]


class Recording(GRPOTrainer):
    def compute_advantages(self, exp):
        advantages, returns = super().compute_advantages(exp)
        self.seen = getattr(self, "seen", []) + [(exp, advantages)]
        return advantages, returns


def test_grpo_with_a_reward_function(tmp_path, models, prompts_with_answers, backbone):
    cfg = load_stage_config(GRPOConfig, None, overrides(tmp_path / "out", models, prompts_with_answers,
                                                        f"reward.function={prompts_with_answers / 'reward.py'}:score"))
    trainer = Recording(cfg, backbone)
    trainer.fit()
    rows = [r for r in metrics(tmp_path / "out") if "grpo/score" in r]
    assert len(rows) == 3
    for key in ("grpo/score", "grpo/kl", "grpo/kl_loss", "grpo/policy_loss", "grpo/clipfrac", "grpo/entropy",
                "grpo/advantages", "grpo/response_length", "time/generate_s", "time/score_policy_s",
                "time/score_ref_policy_s", "time/reward_function_s", "time/policy_update_s", "grpo/episodes_per_s"):
        assert key in rows[0], key
    assert "time/score_value_s" not in rows[0]  # no critic, no reward model
    assert all(abs(r["grpo/ratio_at_start"] - 1) < 1e-5 for r in rows)
    assert trainer.value is None and trainer.reward is None
    for exp, advantages in trainer.seen:
        mask = exp.action_mask.bool()
        assert (advantages[~mask] == 0).all()
        # rows of one prompt are consecutive and answer the same prompt
        assert all(exp.prompts[i] == exp.prompts[i - i % 4] for i in range(len(exp.prompts)))
        # one advantage per response, standardised within its group of 4
        per_row = advantages.sum(1) / mask.sum(1)
        expected = (exp.scores.view(-1, 4) - exp.scores.view(-1, 4).mean(1, keepdim=True)) / (
            exp.scores.view(-1, 4).std(1, keepdim=True) + 1e-4)
        assert torch.allclose(per_row, expected.view(-1), atol=1e-4)
    start = load_file(models / "policy" / "model.safetensors")
    end = load_file(tmp_path / "out" / "final" / "model.safetensors")
    assert all(not torch.equal(start[k], end[k]) for k in start if "embed" not in k)
    assert not (tmp_path / "out" / "final" / "value").exists()


@pytest.mark.parametrize("trainer_cls,config_cls,stage", [(RLOOTrainer, RLOOConfig, "rloo"),
                                                          (ReinforceTrainer, ReinforceConfig, "reinforce")])
def test_rloo_and_reinforce_with_a_reward_model(tmp_path, models, prompts_with_answers, backbone, trainer_cls,
                                               config_cls, stage):
    extra = [f"reward.model.path={models / 'rm'}", "train.max_steps=2", f"{stage}.missing_eos_penalty=1.0"]
    cfg = load_stage_config(config_cls, None, overrides(tmp_path / "out", models, prompts_with_answers, *extra,
                                                        stage=stage))
    trainer_cls(cfg, backbone).fit()
    rows = [r for r in metrics(tmp_path / "out") if f"{stage}/score" in r]
    assert len(rows) == 2 and all(abs(r[f"{stage}/ratio_at_start"] - 1) < 1e-5 for r in rows)
    assert "time/score_reward_s" in rows[0] and f"{stage}/kl" in rows[0]
    if stage == "reinforce":
        assert f"{stage}/returns" in rows[0] and rows[0][f"{stage}/advantages"] == pytest.approx(0, abs=1e-5)


def test_dynamic_sampling_masks_groups_with_equal_scores(tmp_path, models, prompts_with_answers, backbone):
    """A constant reward: every group is filtered out, the loss is 0 and the weights stay."""
    (prompts_with_answers / "const.py").write_text("def f(prompts, responses, **kw):\n    return [1.0] * len(prompts)\n")
    cfg = load_stage_config(GRPOConfig, None, overrides(
        tmp_path / "out", models, prompts_with_answers, f"reward.function={prompts_with_answers / 'const.py'}:f",
        "grpo.dynamic_sampling=true", "grpo.kl_coef=0", "train.max_steps=1"))
    trainer = GRPOTrainer(cfg, backbone)
    trainer.fit()
    row = [r for r in metrics(tmp_path / "out") if "grpo/score" in r][0]
    assert row["grpo/filtered"] == 1.0 and row["grpo/policy_loss"] == 0.0
    assert trainer.ref_policy is None and "grpo/kl" not in row  # kl_coef 0: no reference loaded


@pytest.mark.parametrize("layout", [[], ["rollout.shared_prefix=true", "train.micro_batch_tokens=70"]],
                         ids=["rows", "groups_by_tokens"])  # the second: 2 epochs x 2 minibatches, by tokens
def test_grpo_resume_reproduces(tmp_path, models, prompts_with_answers, backbone, monkeypatch, layout):
    extra = [f"reward.function={prompts_with_answers / 'reward.py'}:score", "train.max_steps=4", "checkpoint.every=2",
             *layout]
    GRPOTrainer(load_stage_config(GRPOConfig, None, overrides(tmp_path / "full", models, prompts_with_answers,
                                                              *extra)), backbone).fit()
    cfg = load_stage_config(GRPOConfig, None, overrides(tmp_path / "cut", models, prompts_with_answers, *extra))
    real = GRPOTrainer.make_experience

    def crash(self, prompts, **kw):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, prompts, **kw)

    monkeypatch.setattr(GRPOTrainer, "make_experience", crash)
    with pytest.raises(KeyboardInterrupt):
        GRPOTrainer(cfg, backbone).fit()
    monkeypatch.setattr(GRPOTrainer, "make_experience", real)
    GRPOTrainer(cfg, backbone).fit()
    keys = ("grpo/score", "grpo/kl", "grpo/policy_loss", "grpo/kl_loss")
    full = [[r[k] for k in keys] for r in metrics(tmp_path / "full") if "grpo/score" in r]
    cut = [[r[k] for k in keys] for r in metrics(tmp_path / "cut") if "grpo/score" in r]
    assert len(full) == 4 and torch.allclose(torch.tensor(full), torch.tensor(cut), atol=1e-6)
    if layout:  # a minibatch (16 rows: 4 groups) ran a group a micro-batch, not the 2 of micro_batch_size 8
        assert all(r["grpo/micro_batches"] == 4 for r in metrics(tmp_path / "cut") if "grpo/score" in r)
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_on_two_ranks_with_zero3(tmp_path, models, prompts_with_answers):
    out = run_two_ranks("grpo", tmp_path, ["3"], overrides(
        tmp_path / "unused", models, prompts_with_answers, f"reward.model.path={models / 'rm'}",
        "grpo.dynamic_sampling=true", "train.max_steps=2",
        # micro-batches by tokens: the ranks' responses differ, so may the counts they need; they agree
        "rollout.shared_prefix=true", "train.micro_batch_tokens=90")[1:])
    rows = [r for r in metrics(tmp_path / "zero3") if "grpo/score" in r]
    assert len(rows) == 2 and all(abs(r["grpo/ratio_at_start"] - 1) < 1e-5 for r in rows), out[-2000:]
    assert all(r["grpo/micro_batches"] > 1 for r in rows)  # a minibatch is 2 groups of 4 a rank: one micro-batch each


# --------------------------------------------------------------------------- reward sources


def test_reward_function_errors_name_the_function_and_row(prompts_with_answers):
    rows = [{"prompt": "p", "fields": {"answer": "a"}, "where": "train.jsonl:7"}] * 2
    path = prompts_with_answers / "reward.py"
    assert FunctionReward(f"{path}:score")(["p", "p"], ["abc", "x"], rows) == pytest.approx([1.3, 0.1])
    with pytest.raises(RewardError, match=r"reward.py:boom raised KeyError.*train.jsonl:7"):
        FunctionReward(f"{path}:boom")(["p", "p"], ["a", "b"], rows)
    with pytest.raises(RewardError, match=r"reward.py:short returned 1 scores for 2 responses"):
        FunctionReward(f"{path}:short")(["p", "p"], ["a", "b"], rows)
    with pytest.raises(ValueError, match="cannot load 'rlhf.task:nope'"):
        FunctionReward("rlhf.task:nope")
    # a module path works too, and the sum weighs each source
    from rlhf.config import RewardConfig

    sources = RewardSources(RewardConfig(function="rlhf.task:gold_rewards", weights={"function": 2.0}))
    prompt = "Describe the apple.\n"
    assert sources.score(None, [prompt], ["lovely."], rows[:1]).tolist() == [2.0]


class _Scorer(BaseHTTPRequestHandler):
    calls = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Scorer.calls.append(body)
        out = {"scores": [float(len(r)) for r in body["responses"]]}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_reward_batches_and_fails_clearly():
    server = HTTPServer(("127.0.0.1", 0), _Scorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    rows = [{"prompt": "p", "fields": {"answer": str(i)}, "where": f"f.jsonl:{i}"} for i in range(5)]
    try:
        got = HttpReward(url, batch_size=2, timeout_s=5, retries=0)(["p"] * 5, ["a", "bb", "", "dddd", "e"], rows)
    finally:
        server.shutdown()
        server.server_close()
    assert got == [1.0, 2.0, 0.0, 4.0, 1.0]
    assert [len(c["responses"]) for c in _Scorer.calls] == [2, 2, 1] and _Scorer.calls[0]["answer"] == ["0", "1"]
    with pytest.raises(RewardError, match=r"no answer after 2 tries .*is the reward server running"):
        HttpReward(url, batch_size=2, timeout_s=1, retries=1)(["p"], ["a"], rows[:1])


# --------------------------------------------------------------------------- configs and the registry


def test_on_policy_configs(tmp_path):
    (tmp_path / "p.jsonl").write_text("")
    base = ["policy.model.path=x", f"data.path={tmp_path / 'p.jsonl'}"]
    with pytest.raises(ConfigError, match="rollout.n: GRPO compares each response"):
        load_stage_config(GRPOConfig, None, [*base, "reward.function=m:f", "rollout.n=1"])
    with pytest.raises(ConfigError, match="no reward source"):
        load_stage_config(GRPOConfig, None, base)
    with pytest.raises(ConfigError, match="weights.url: names no reward source"):
        load_stage_config(GRPOConfig, None, [*base, "reward.function=m:f", "reward.weights.url=2"])
    cfg = load_stage_config(GRPOConfig, None, [*base, "reward.function=m:f"])
    assert cfg.rollout.n == 8 and cfg.grpo.loss_aggregation == "seq_mean_token_mean" and cfg.grpo.kl_in == "loss"
    assert load_stage_config(RLOOConfig, None, [*base, "reward.function=m:f"]).rloo.advantage == "rloo"
    with pytest.raises(ConfigError, match="train.micro_batch_tokens: must be > 0"):
        load_stage_config(GRPOConfig, None, [*base, "reward.function=m:f", "train.micro_batch_tokens=0"])
    from rlhf.config import SFTConfig

    with pytest.raises(ConfigError, match=r"train.micro_batch_tokens: applies to the on-policy stages .* not sft"):
        load_stage_config(SFTConfig, None, ["model.path=x", f"data.path={tmp_path / 'p.jsonl'}",
                                            "train.micro_batch_tokens=512"])


def test_single_stage_file_with_its_own_hyperparameter_group(tmp_path):
    """A single-stage PPO file's `ppo:` group is PPO's hyperparameters, not a section."""

    def write(name, text):
        (tmp_path / "p.jsonl").write_text("")
        (tmp_path / name).write_text(f"data: {{path: {tmp_path / 'p.jsonl'}}}\n" + text)
        return tmp_path / name

    single = write("ppo.yaml", "policy: {model: {path: p}}\nvalue: {model: {path: r}}\n"
                               "reward: {model: {path: r}}\nppo: {epochs: 3, kl_coef: 0.2}\n")
    cfg = load_stage_config(PPOConfig, single)
    assert cfg.ppo.epochs == 3 and cfg.policy.model.path == "p"
    grpo = write("grpo.yaml", "policy: {model: {path: p}}\nreward: {function: 'm:f'}\ngrpo: {advantage: dr_grpo}\n")
    assert load_stage_config(GRPOConfig, grpo).grpo.advantage == "dr_grpo"
    # a multi-stage file whose ppo: section holds stage keys is still one
    multi = write("multi.yaml", "output_dir: /tmp/x\nppo: {policy: {model: {path: p}}, value: {model: {path: r}}, "
                                "reward: {model: {path: r}}, ppo: {epochs: 2}}\n")
    cfg = load_stage_config(PPOConfig, multi)
    assert cfg.ppo.epochs == 2 and cfg.output_dir == "/tmp/x/ppo"


def test_registry_drives_the_cli():
    from rlhf.cli import main
    from rlhf.stages import REGISTRY, trainer_class

    assert trainer_class("grpo") is GRPOTrainer and REGISTRY["reinforce"].config is ReinforceConfig
    for name in REGISTRY:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0


def test_a_new_algorithm_is_one_small_class(tmp_path, models, prompts_with_answers, backbone):
    """The README's example: GRPO with the group's median as its baseline."""
    from rlhf.trainers.algorithms import GroupPolicyGradient
    from rlhf.trainers.onpolicy import OnPolicyTrainer

    class MedianBaseline(GroupPolicyGradient):
        def compute_advantages(self, exp):
            groups = exp.rewards.view(-1, self.cfg.rollout.n)
            advantages = (groups - groups.median(dim=1, keepdim=True).values).view(-1)
            return advantages[:, None] * exp.action_mask, None

    class MedianGRPO(OnPolicyTrainer):
        stage = "grpo"
        algorithm_class = MedianBaseline

    cfg = load_stage_config(GRPOConfig, None, overrides(tmp_path / "out", models, prompts_with_answers,
                                                        f"reward.function={prompts_with_answers / 'reward.py'}:score",
                                                        "train.max_steps=1"))
    trainer = MedianGRPO(cfg, backbone)
    trainer.fit()
    row = [r for r in metrics(tmp_path / "out") if "grpo/score" in r][0]
    assert abs(row["grpo/ratio_at_start"] - 1) < 1e-5 and (tmp_path / "out" / "final").is_dir()
