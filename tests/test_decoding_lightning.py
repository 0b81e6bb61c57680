"""Decoding as a Lightning test loop: same tokens as a direct call, metrics logged to MLflow."""
from __future__ import annotations

from decoding_fixtures import OracleDraft, prompts_of, tiny_target
from scylla import paths, tracking
from scylla.config import DecodeConfig
from scylla.decoding import METHODS
from scylla.decoding.evaluation import evaluate


def test_lightning_loop_matches_direct_call_and_logs_to_mlflow(mlflow_store):
    from lightning.pytorch.loggers import MLFlowLogger

    target = tiny_target(96)
    prompts = prompts_of([5, 8, 3, 7, 6], 96)
    cfg = DecodeConfig(method="tree", max_new_tokens=12, decode_batch_size=2, tree_top_k=2,
                       tree_depth=3, tree_total_tokens=5)
    draft = OracleDraft(target)
    direct = METHODS["tree"](target, prompts, cfg, draft)
    with tracking.stage_run("decode", {"method": "tree"}) as run:
        logger = MLFlowLogger(tracking_uri=paths.tracking_uri(), run_id=run.info.run_id)
        res, metrics = evaluate(target, prompts, cfg, draft,
                                categories=["qa", "math", "qa", "qa", "math"],
                                prompts_per_step=3, logger=logger, accelerator="cpu")
    assert res.tokens == direct.tokens
    assert abs(metrics["decode/tau"] - res.tau) < 1e-6 and res.tau > 2
    assert {"decode/tau/qa", "decode/tau/math", "decode/alpha_at_0"} <= set(metrics)
    mlflow = tracking.mlflow_client_ready()
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert abs(logged["decode/tau"] - res.tau) < 1e-6
    assert logged["decode/new_tokens"] == sum(len(t) for t in res.tokens)
