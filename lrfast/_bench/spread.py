"""Between-run spreads of the bench targets' statistics (written by
bench/target_spread.py; regenerate it there rather than editing it)."""
# 14 runs of python -m lrfast bench on AMD EPYC, 2026-12-01.
# PARTS: a part's max/min over the runs (at least 1.1), for parts measured in >= 5 runs.
# FAMILIES: the largest spread of a family's parts, for parts measured in fewer.
PARTS = {
    'adagrad f32 16M: Adagrad': 1.76,
    'adagrad f32 16M: floor': 1.12,
    'adagrad f32 16M: torch-fastest/lrfast': 1.34,
    'adam f32 1000x256 flat: torch-fused/lrfast': 2.42,
    'adam f32 1000x256: torch-fused/lrfast': 1.75,
    'adam f32 16M: Adam': 1.50,
    'adam f32 16M: floor': 2.10,
    'adam f32 16M: torch-fused/lrfast': 1.33,
    'adam f32 1M threads 1->2: speedup': 1.75,
    'adam f32 1k: Adam.step': 1.78,
    'adam f32 1k: torch-loop/lrfast': 1.37,
    'adam f32 200x10k: torch-fused/lrfast': 1.78,
    'adam f64 1000x256 flat: torch-fused/lrfast': 2.65,
    'adam f64 1000x256: torch-fused/lrfast': 2.45,
    'adam f64 1k: torch-loop/lrfast': 1.62,
    'adam f64 200x10k: torch-fused/lrfast': 1.61,
    'adamw f32 16M: AdamW': 1.77,
    'adamw f32 16M: floor': 1.45,
    'adamw f32 16M: torch-fastest/lrfast': 1.32,
    'rmsprop f32 16M: RMSprop': 1.37,
    'rmsprop f32 16M: floor': 1.16,
    'sgd f32 16M: SGD': 1.19,
    'sgd f32 16M: floor': 1.22,
    'sgd f32 16M: torch-fastest/lrfast': 1.22,
    'torch-api adam f32 16M: torch-fused/lrfast': 1.22,
    'torch-api adam f32 transformer: torch-fused/lrfast': 1.22,
}
FAMILIES = {
    '16M': 2.10,
    '1k': 1.78,
    'multi-tensor': 2.65,
    'threads': 1.75,
    'torch-api': 1.22,
}
