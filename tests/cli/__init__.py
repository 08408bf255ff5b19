"""CLI tests. ``fail_one_line`` runs the CLI and asserts a one-line error with exit code 2."""


def fail_one_line(capsys, argv) -> str:
    from qeff_graph.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err
