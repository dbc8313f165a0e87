"""The paper's studies: which experiment presets make each table, and the paper's numbers.

Used by :mod:`mabn.lab.collect` (``scripts/collect_results.py``, to lay out the tables) and by
the tests that check that each study's Hydra multirun expands to exactly these configurations. The
multirun itself is ``configs/study/<study>.yaml`` (``python train_imagenet.py -m +study=<study>
...``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measure:
    """The number a study compares: a key of the runs' metrics.json and how tables name it."""
    key: str  # metrics.json key
    title: str  # the table's caption: "Top-1 validation error (%)"
    column: str  # a column: "top-1 err"
    noun: str  # in sentences: "error"
    short: str  # in formulas: "err"
    higher_is_better: bool


#: The classifier's studies compare the top-1 error; the detection studies the box AP (and the
#: mask AP in their tables and claims).
TOP1 = Measure("val_top1_err", "Top-1 validation error (%)", "top-1 err", "error", "err", False)
BOX_AP = Measure("bbox_AP", "Box AP (%)", "box AP", "box AP", "AP", True)
MASK_AP = Measure("segm_AP", "Mask AP (%)", "mask AP", "mask AP", "mask AP", True)
#: The COCOeval iou type of each AP measure (whose per-image matches a run keeps).
IOU_TYPE = {BOX_AP: "bbox", MASK_AP: "segm"}


@dataclass(frozen=True)
class Row:
    key: str  # the experiment preset (configs/experiment/<key>.yaml, configs/det_experiment/<key>.yaml)
    label: str  # the row as the paper prints it
    paper: float | None  # the paper's value of the study's measure (top-1 error, box AP); None = "-"
    #: The value of the setting the study sweeps besides the preset (``SWEPT_KEY[study]``): the
    #: normalization batch size in Figure 1(b), the schedule length in the convergence check;
    #: None in a study that sweeps only presets (Tables 2 and 4).
    swept_value: int | tuple | None = None
    #: The paper's values of the other measures the table shows (metrics.json key, value): e.g.
    #: the mask AP of a detection row.
    paper_more: tuple[tuple[str, float], ...] = ()


#: The config key each study sweeps besides the preset (dotted: section.field), or a tuple of
#: keys (a row's swept_value is then the tuple of their values); studies not named here sweep only
#: presets. The collector groups a study's runs by (preset, this key's value).
SWEPT_KEY = {"figure1b": "norm.norm_batch_size", "convergence": "schedule.iterations",
             "det_convergence": "schedule.iterations", "det_data_size": "data.name",
             "row5_probe": ("schedule.policy", "optim.lr", "norm.r_max"),
             "brn_b32_probe": ("norm.norm_batch_size", "norm.r_max", "norm.alpha")}


TABLE2 = [
    Row("table2_row1_bn_regular", "1 BN, regular (b=32)", 23.41),
    Row("table2_row2_modified_regular", "2 modified, regular (b=32)", 23.53),
    Row("table2_row3_bn_small", "3 BN", 35.22),
    Row("table2_row4_brn", "4 vanilla + EMAS in FP (BRN)", 30.29),
    Row("table2_row5_brn_sma", "5 vanilla + EMAS in FP + SMAS in BP", None),
    Row("table2_row6_modified_small", "6 modified", 29.68),
    Row("table2_row7_modified_ema", "7 modified + EMAS in FP", 27.03),
    Row("table2_row8_mabn", "8 modified + EMAS in FP + SMAS in BP (MABN)", 23.58),
]

TABLE4 = [
    Row("table4_row1_mabn", "1 modified, WC, EMAS / SMAS (MABN)", 23.58),
    Row("table4_row2_wc_sma_sma", "2 modified, WC, SMAS / SMAS", 26.63),
    Row("table4_row3_wc_ema_ema", "3 modified, WC, EMAS / EMAS", 24.83),
    Row("table4_row4_wc_ema_bs", "4 modified, WC, EMAS / BS", 27.03),
    Row("table4_row5_wc_bs_bs", "5 modified, WC, BS / BS", 29.68),
    Row("table4_row6_ema_sma", "6 modified, EMAS / SMAS", 25.45),
    Row("table4_row7_ema_bs", "7 modified, EMAS / BS", 29.57),
    Row("table4_row8_bs_bs", "8 modified, BS / BS", 32.95),
    Row("table4_row9_bn_small", "9 vanilla, BS / BS (BN)", 35.22),
    Row("table4_row10_wc_bn_small", "10 vanilla, WC, BS / BS", 34.27),
    Row("table4_row11_modified_regular", "11 modified, BS / BS, regular (b=32)", 23.35),
]

# Figure 1(b): ImageNet top-1 error of ResNet-50 against the normalization batch size (gradient
# batch 32 per GPU). The paper gives the curve only as a plot; numbers exist for |B| = 2 and 32
# (Table 1). The presets are the Table 2 rows of each method with norm.norm_batch_size swept.
FIGURE1B_SIZES = (2, 4, 8, 16, 32)
FIGURE1B_METHODS = {
    "BN": ("table2_row3_bn_small", {2: 35.22, 32: 23.41}),
    "BRN": ("table2_row4_brn", {2: 30.29}),
    "MABN": ("table2_row8_mabn", {2: 23.58}),
}
FIGURE1B = [Row(preset, f"{method}, b={b}", paper.get(b), b)
            for method, (preset, paper) in FIGURE1B_METHODS.items() for b in FIGURE1B_SIZES]

# The convergence check of a protocol (configs/study/convergence.yaml): BN(32) and MABN(2) at the
# protocol's schedule and at twice its length. The rows carry no schedule length: the collector
# makes one row per length found among the runs (schedule.iterations, SWEPT_KEY).
CONVERGENCE = [TABLE2[0], TABLE2[7]]
#: A schedule is called converged when doubling it changes each row's mean error by less than this.
CONVERGENCE_TOLERANCE = 1.5

#: Configurations of one study that are exactly another's: the same resolved config but the preset's
#: name (tests/test_studies.py checks it), keyed like the collector's run keys (preset, and the
#: swept value: the normalization batch size for Figure 1(b)). When a row has no run of its own,
#: the collector takes the runs of the configuration it names here (given the other study's runs
#: folder too), so a reproduction need not train the same configuration twice.
SAME_AS = {
    ("table4_row1_mabn", None): ("table2_row8_mabn", None),
    ("table4_row4_wc_ema_bs", None): ("table2_row7_modified_ema", None),
    ("table4_row5_wc_bs_bs", None): ("table2_row6_modified_small", None),
    ("table4_row9_bn_small", None): ("table2_row3_bn_small", None),
    ("table2_row3_bn_small", 32): ("table2_row1_bn_regular", 32),  # Figure 1(b): BN at b = 32
}

# The probes of Table 2's BRN rows (configs/study/row5_probe.yaml, brn_b32_probe.yaml): one
# setting of a row changed at a time; the rows "as in Table 2" / "as in Figure 1(b)" are those
# studies' runs (give their folders too). Row 5: (lr policy, lr, r_max); BRN at b = 32:
# (normalization batch, r_max, alpha).
ROW5_PROBE = [
    Row("table2_row5_brn_sma", "row 5 (BRN + SMA in BP), as in Table 2", None, ("linear", 0.05, 3.0)),
    Row("table2_row5_brn_sma", "row 5, the paper's step schedule", None, ("step", 0.05, 3.0)),
    Row("table2_row5_brn_sma", "row 5, lr 0.2", None, ("linear", 0.2, 3.0)),
    Row("table2_row5_brn_sma", "row 5, no renorm clipping (r_max = d_max = 1000)", None, ("linear", 0.05, 1000.0)),
    Row("table2_row8_mabn", "row 8 (MABN), as in Table 2", 23.58, ("linear", 0.05, 5.0)),
    Row("table2_row8_mabn", "row 8, the paper's step schedule", None, ("step", 0.05, 5.0)),
    Row("table2_row8_mabn", "row 8, lr 0.2", None, ("linear", 0.2, 5.0)),
]
BRN_B32_PROBE = [
    Row("table2_row1_bn_regular", "BN(32), as in Table 2", 23.41, (32, 5.0, 0.9)),
    Row("table2_row4_brn", "BRN at b = 32, as in Figure 1(b)", None, (32, 3.0, 0.9)),
    Row("table2_row4_brn", "BRN at b = 32, no renormalization (r_max 1, d_max 0)", None, (32, 1.0, 0.9)),
    Row("table2_row4_brn", "BRN at b = 32, alpha 0.99", None, (32, 3.0, 0.99)),
]

# The detection studies (scripts/train_detection.py, configs/study/det_*.yaml): the paper's
# Table 3 (Mask R-CNN R50-FPN from scratch on COCO, 2x, norm in the backbone; box / mask AP),
# with GN beside it (not in the paper's table), and the convergence check of the small protocol.
DET_TABLE3 = [
    Row("table3_bn", "BN(2)", 30.41, paper_more=(("segm_AP", 27.91),)),
    Row("table3_brn", "BRN(2)", 31.93, paper_more=(("segm_AP", 29.16),)),
    Row("table3_syncbn", "SyncBN(16); one process: SyncBN(2k)", 34.81, paper_more=(("segm_AP", 31.69),)),
    Row("table3_mabn", "MABN(2)", 34.85, paper_more=(("segm_AP", 31.61),)),
    Row("table3_gn", "GN (not in the paper's table)", None),
]
DET_CONVERGENCE = [DET_TABLE3[0], DET_TABLE3[3]]
# Table 5: the same rows with the normalization also in the heads (4conv1fc box head, mask head;
# the paper's numbers are the authors' README's 2x from scratch). Table 7: RetinaNet, box AP only.
DET_TABLE5 = [
    Row("table5_bn", "BN(2)", 32.38, paper_more=(("segm_AP", 29.07),)),
    Row("table5_brn", "BRN(2)", 34.07, paper_more=(("segm_AP", 30.98),)),
    Row("table5_syncbn", "SyncBN(16); one process: SyncBN(2k)", 36.81, paper_more=(("segm_AP", 33.11),)),
    Row("table5_mabn", "MABN(2)", 36.50, paper_more=(("segm_AP", 32.69),)),
    Row("table5_gn", "GN (not in the paper's table)", None),
]
# The data-size probe of Table 3 at 6,000 iterations (configs/study/det_data_size.yaml): BN(2) and
# MABN(2) on the protocol's 2,000 training images (Table 3's runs: give their folders too) and on
# det-tiny10-8k's 8,000 (the same first 2,000, the same validation images), keyed by data.name.
DET_DATA_SIZES = {"det-tiny10": "2,000", "det-tiny10-8k": "8,000"}
DET_DATA_SIZE = [Row(row.key, f"{row.label}, {images} training images", None, name)
                 for name, images in DET_DATA_SIZES.items() for row in DET_CONVERGENCE]
DET_TABLE7 = [
    Row("table7_syncbn", "RetinaNet, SyncBN(16); one process: SyncBN(2k)", 29.80),
    Row("table7_mabn", "RetinaNet, MABN(2)", 29.52),
]

STUDIES = {"table2": TABLE2, "table4": TABLE4, "figure1b": FIGURE1B, "convergence": CONVERGENCE,
           "det_table3": DET_TABLE3, "det_convergence": DET_CONVERGENCE, "det_table5": DET_TABLE5,
           "det_table7": DET_TABLE7, "det_data_size": DET_DATA_SIZE, "row5_probe": ROW5_PROBE,
           "brn_b32_probe": BRN_B32_PROBE}
#: The measure each study compares (TOP1 unless named here).
MEASURE = {"det_table3": BOX_AP, "det_convergence": BOX_AP, "det_table5": BOX_AP, "det_table7": BOX_AP,
           "det_data_size": BOX_AP}
#: The measures a study's table shows, its own first.
SHOWN = {"det_table3": (BOX_AP, MASK_AP), "det_convergence": (BOX_AP, MASK_AP), "det_table5": (BOX_AP, MASK_AP),
         "det_data_size": (BOX_AP, MASK_AP),
         "det_table7": (BOX_AP,)}
#: A schedule is converged when doubling it moves each row's mean by less than this (points).
TOLERANCE = {"convergence": CONVERGENCE_TOLERANCE, "det_convergence": 1.0}
#: The margin (points of the study's measure) of the equivalence claims ("equal"): the paper's
#: "no difference" / "comparable" is tested as |gap| < margin by two one-sided tests. 1.5 points of
#: top-1 error is 0.7 of one run's sampling std on the 500 validation images (2.2 points) and under
#: half the gap MABN closes between rows 7 and 8 of Table 2 (3.45); 1 point of box AP is a tenth
#: of the small detection protocol's AP.
#: A "diverges" claim's test on a run that finished: the run collapsed when its logged training loss
#: (the mean over each logging interval) rose this far above its lowest value so far, a spike its
#: optimizer did not absorb (on the Table 2 protocol, ordinary runs rise by at most 0.45).
COLLAPSE_RISE = 1.0

EQUIVALENCE_MARGIN = {"table2": 1.5, "table4": 1.5, "figure1b": 1.5, "convergence": 1.5,
                      "row5_probe": 1.5, "brn_b32_probe": 1.5,
                      "det_table3": 1.0, "det_convergence": 1.0, "det_table5": 1.0, "det_table7": 1.0,
                      "det_data_size": 1.0}


def measure_of(study: str) -> Measure:
    """The measure ``study`` compares."""
    return MEASURE.get(study, TOP1)


def _probe(rows: list[Row], i: int) -> tuple:
    """A probe's row ``i`` as a claim's (key, swept value)."""
    return (rows[i].key, rows[i].swept_value)


#: The regular-batch BN row that the "gap" column is measured against, per study.
REFERENCE = {"table2": ("table2_row1_bn_regular", None), "table4": ("table4_row11_modified_regular", None),
             "figure1b": ("table2_row3_bn_small", 32), "convergence": ("table2_row1_bn_regular", None),
             "det_table3": ("table3_syncbn", None), "det_convergence": ("table3_bn", None),
             "det_table5": ("table5_syncbn", None), "det_table7": ("table7_syncbn", None),
             "det_data_size": _probe(DET_DATA_SIZE, 0),
             "row5_probe": _probe(ROW5_PROBE, 4), "brn_b32_probe": _probe(BRN_B32_PROBE, 0)}


@dataclass(frozen=True)
class Claim:
    """One comparison the paper's text makes, checked on our runs by the collector.

    ``a`` and ``b`` are rows (keyed as the collector's run keys: preset, and the swept value:
    the normalization batch size for Figure 1(b)); the claim is about m(a) - m(b) of the study's
    measure m (or ``measure``), the paired gap over the seeds both finished. ``kind`` is what the
    paper says of it: "higher" (a's value is larger: a larger error, a larger AP), "lower",
    "equal" (no real difference), or "diverges" (``a``'s training cannot converge; ``b`` unused).
    The paper's own gap is the difference of the two rows' paper values (none where either is
    None)."""
    text: str
    kind: str
    a: tuple[str, int | None]
    b: tuple[str, int | None] | None = None
    measure: Measure | None = None


def _t2(n: int) -> tuple[str, None]:
    return (TABLE2[n - 1].key, None)


def _t4(n: int) -> tuple[str, None]:
    return (TABLE4[n - 1].key, None)


def _f1b(method: str, b: int) -> tuple[str, int]:
    return (FIGURE1B_METHODS[method][0], b)


def _t3(name: str, table: int = 3) -> tuple[str, None]:
    return (f"table{table}_{name}", None)


#: The paper's claims per study: Table 1 and section 5.1's text (Table 2's rows; Table 1 is rows
#: 1, 3, 4 and 8), section 4.3 and appendix B.2 (Table 4), section 5.1 (Figure 1(b)).
CLAIMS = {
    "table2": [
        Claim("Table 1 / 5.1: BN with a small batch severely worsens the model (3 vs 1)", "higher", _t2(3), _t2(1)),
        Claim("Table 1 / 5.1: BRN is still far from complete recovery (4 vs 1)", "higher", _t2(4), _t2(1)),
        Claim("Table 1 / 5.1: MABN almost completely restores BN(32) (8 vs 1)", "equal", _t2(8), _t2(1)),
        Claim("5.1: EMAS in FP (BRN) restores BN(2) to some extent (4 vs 3)", "lower", _t2(4), _t2(3)),
        Claim("5.1: SMAS in BP with BRN collapses during training (row 5)", "diverges", _t2(5)),
        Claim("5.1: modified normalization slightly outperforms BRN at b = 2 (6 vs 4)", "lower", _t2(6), _t2(4)),
        Claim("5.1: modified normalization shows no superiority to vanilla at b = 32 (2 vs 1)", "equal",
              _t2(2), _t2(1)),
        Claim("5.1: with EMAS in FP, modified normalization reduces the error further (7 vs 6)", "lower",
              _t2(7), _t2(6)),
        Claim("5.1: modified + EMAS in FP still fails to restore BN(32) (7 vs 1)", "higher", _t2(7), _t2(1)),
        Claim("5.1: SMAS in BP fills the rest of the gap (8 vs 7)", "lower", _t2(8), _t2(7)),
    ],
    "table4": [
        Claim("4.3: WC has little benefit for vanilla normalization (10 vs 9)", "equal", _t4(10), _t4(9)),
        Claim("4.3: WC significantly improves modified normalization, EMAS / SMAS (1 vs 6)", "lower", _t4(1), _t4(6)),
        Claim("4.3: WC significantly improves modified normalization, EMAS / BS (4 vs 7)", "lower", _t4(4), _t4(7)),
        Claim("4.3: WC significantly improves modified normalization, BS / BS (5 vs 8)", "lower", _t4(5), _t4(8)),
        Claim("B.2: EMAS beats SMAS in FP (1 vs 2)", "lower", _t4(1), _t4(2)),
        Claim("B.2: SMAS beats EMAS in BP (1 vs 3)", "lower", _t4(1), _t4(3)),
        Claim("B.2: SMAS beats batch statistics in BP (1 vs 4)", "lower", _t4(1), _t4(4)),
        Claim("MABN at b = 2 restores modified normalization at b = 32 (1 vs 11)", "equal", _t4(1), _t4(11)),
    ],
    "figure1b": [
        Claim("5.1: BN heavily relies on the batch size (BN b=2 vs b=32)", "higher", _f1b("BN", 2), _f1b("BN", 32)),
        Claim("5.1: BRN heavily relies on the batch size (BRN b=2 vs b=32)", "higher", _f1b("BRN", 2), _f1b("BRN", 32)),
        Claim("5.1: BRN performs better than vanilla BN (b=2)", "lower", _f1b("BRN", 2), _f1b("BN", 2)),
        Claim("5.1: MABN retains its error regardless of the batch size (MABN b=2 vs b=32)", "equal",
              _f1b("MABN", 2), _f1b("MABN", 32)),
    ],
    "row5_probe": [
        Claim("5.1: row 5 collapses, the paper's step schedule", "diverges", _probe(ROW5_PROBE, 1)),
        Claim("5.1: row 5 collapses, lr 0.2", "diverges", _probe(ROW5_PROBE, 2)),
        Claim("5.1: row 5 collapses, no renorm clipping", "diverges", _probe(ROW5_PROBE, 3)),
        Claim("row 5 worse than MABN (row 8), the paper's step schedule", "higher",
              _probe(ROW5_PROBE, 1), _probe(ROW5_PROBE, 5)),
        Claim("row 5 worse than MABN (row 8), lr 0.2", "higher",
              _probe(ROW5_PROBE, 2), _probe(ROW5_PROBE, 6)),
    ],
    "brn_b32_probe": [
        Claim("BRN at a large batch trains like BN (Ioffe 2017): BRN vs BN(32)", "equal",
              _probe(BRN_B32_PROBE, 1), _probe(BRN_B32_PROBE, 0)),
        Claim("without renormalization BRN is BN: BRN (r = 1, d = 0) vs BN(32)", "equal",
              _probe(BRN_B32_PROBE, 2), _probe(BRN_B32_PROBE, 0)),
        Claim("renormalization costs error at b = 32: BRN vs BRN (r = 1, d = 0)", "higher",
              _probe(BRN_B32_PROBE, 1), _probe(BRN_B32_PROBE, 2)),
    ],
    "det_table3": [
        Claim("5.2: MABN(2) clearly outperforms BN(2), box AP", "higher", _t3("mabn"), _t3("bn")),
        Claim("5.2: MABN(2) clearly outperforms BN(2), mask AP", "higher", _t3("mabn"), _t3("bn"), MASK_AP),
        Claim("5.2: MABN(2) outperforms BRN(2), box AP", "higher", _t3("mabn"), _t3("brn")),
        Claim("5.2: MABN(2) is comparable with SyncBN, box AP", "equal", _t3("mabn"), _t3("syncbn")),
        Claim("5.2: MABN(2) is comparable with SyncBN, mask AP", "equal", _t3("mabn"), _t3("syncbn"), MASK_AP),
        Claim("Table 3: BRN(2) above BN(2), box AP", "higher", _t3("brn"), _t3("bn")),
        Claim("Table 3: BRN(2) below SyncBN, box AP", "lower", _t3("brn"), _t3("syncbn")),
    ],
    "det_table5": [
        Claim("B.3: with norm in the heads, MABN(2) outperforms BN(2), box AP", "higher", _t3("mabn", 5), _t3("bn", 5)),
        Claim("B.3: with norm in the heads, MABN(2) outperforms BRN(2), box AP", "higher",
              _t3("mabn", 5), _t3("brn", 5)),
        Claim("B.3: with norm in the heads, MABN(2) is comparable with SyncBN, box AP", "equal",
              _t3("mabn", 5), _t3("syncbn", 5)),
        Claim("B.3: with norm in the heads, MABN(2) is comparable with SyncBN, mask AP", "equal",
              _t3("mabn", 5), _t3("syncbn", 5), MASK_AP),
    ],
    "det_data_size": [
        Claim("5.2: MABN(2) outperforms BN(2), box AP, on 2,000 training images (Table 3)", "higher",
              _probe(DET_DATA_SIZE, 1), _probe(DET_DATA_SIZE, 0)),
        Claim("5.2: MABN(2) outperforms BN(2), box AP, on 8,000 training images", "higher",
              _probe(DET_DATA_SIZE, 3), _probe(DET_DATA_SIZE, 2)),
        Claim("4x the training images raise MABN(2)'s box AP", "higher",
              _probe(DET_DATA_SIZE, 3), _probe(DET_DATA_SIZE, 1)),
        Claim("4x the training images raise BN(2)'s box AP", "higher",
              _probe(DET_DATA_SIZE, 2), _probe(DET_DATA_SIZE, 0)),
    ],
    "det_table7": [
        Claim("B.3: RetinaNet, MABN(2) is comparable with SyncBN, box AP", "equal", _t3("mabn", 7), _t3("syncbn", 7)),
    ],
}
