"""Human-readable statistics of a prepared dataset, from its manifest alone."""

from __future__ import annotations


def format_table(rows: list[tuple[str, object]], title: str = "") -> str:
    """Two aligned columns: name, value (numbers with thousands separators)."""

    def show(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    width = max(len(name) for name, _ in rows)
    lines = [title] if title else []
    lines += [f"  {name:<{width}}  {show(value)}" for name, value in rows]
    return "\n".join(lines)


def format_statistics(manifest: dict) -> str:
    counts, source = manifest["counts"], manifest["source"]
    total = sum(manifest["rating_histogram"].values())
    rows: list[tuple[str, object]] = [
        ("source", f"{source['family']} / {source['format']}"),
        ("rows read", counts["rows_read"]),
        ("duplicates dropped", counts["duplicates_dropped"]),
        ("after item filter", counts["rows_after_item_filter"]),
        ("after user filter", counts["rows_after_user_filter"]),
        ("users", counts["users"]),
        ("items (vocab - 1)", counts["items"]),
        (
            "train / valid / test users",
            f"{counts['train_users']:,} / {counts['valid_users']:,} / {counts['test_users']:,}",
        ),
        ("mean length", manifest["mean_length"]),
        ("mean min(length, 30)", manifest["mean_usable_length"]),
        ("balance score (0..1)", manifest["balance_score"]),
    ]
    rows += [
        (f"rating {level}", f"{n:,} ({n / total:.1%})")
        for level, n in manifest["rating_histogram"].items()
    ]
    return format_table(rows, "dataset statistics")
