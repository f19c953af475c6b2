"""The paper's reference numbers and the checks made on them."""

from fishertune.report.paper import inconsistent_average, paper_table


def test_exactly_the_papers_known_misprinted_averages_are_flagged():
    # results/paper/README.md: CLIP VQT prints 55.3 for a mean of 54.07, EVA02 Full 60.9 for 60.97;
    # every other printed average is its three targets' mean rounded to one decimal.
    df = paper_table("table1")
    flagged = {(r.backbone, r.method) for r in df.itertuples() if inconsistent_average(r._asdict()) is not None}
    assert flagged == {("clip-vit-l", "vqt"), ("eva02-l", "full")}
