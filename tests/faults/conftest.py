"""Collects the fault matrix's outcomes (also from xdist workers) and prints the table at the end."""

OUTCOMES: dict[tuple[str, str], str] = {}


def pytest_runtest_logreport(report):
    for key, value in report.user_properties:
        if key == "fault_outcome" and report.when == "call":
            condition, notebook, outcome = value
            OUTCOMES[(condition, notebook)] = outcome


def pytest_terminal_summary(terminalreporter):
    if not OUTCOMES:
        return
    from conditions import ALL, CONDITIONS

    names = [c.name for c in CONDITIONS if any((c.name, nb) in OUTCOMES for nb in ALL)]
    width = max(len(n) for n in names)
    terminalreporter.write_sep("=", "fault matrix: condition x notebook")
    terminalreporter.write_line(" " * width + "  " + "  ".join(f"{nb:^9}" for nb in ALL))
    for name in names:
        cells = [OUTCOMES.get((name, nb), "-") for nb in ALL]
        terminalreporter.write_line(f"{name:<{width}}  " + "  ".join(f"{c:^9}" for c in cells))
    terminalreporter.write_line("completed: ran to the end, the affected cells skipped with a reason; stopped: one "
                                "sentence in the first cells; -: not run (the notebook does not use what is missing)")
