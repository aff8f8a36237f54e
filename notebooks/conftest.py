"""nbval settings for the course notebooks (``pytest --nbval-lax notebooks/``).

Every notebook runs in the ci profile, checks included. Notebooks that need a
well-trained network load the checkpoints in ``checkpoints/`` (made by
``regedu train``; the command is next to each file).
"""

import ast

import pytest

_IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml")


def _is_call(node, owner: str, prefix: str) -> bool:
    f = getattr(node, "func", None)
    return (isinstance(node, ast.Call) and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
            and f.value.id == owner and f.attr.startswith(prefix))


def plotting_calls(source: str) -> tuple[list[str], list[str]]:
    """The figure-making statements at the top of a cell (``viz.plot_*``, ``plt.show()``), and those
    of them that end in ';'.

    Only top-level statements count: inside a def, a loop or an if a call may run any number of
    times. regedu.viz returns closed figures, shown when one is the cell's last expression or
    passed to display(); a trailing ';' hides it in JupyterLab (though not under nbval, which runs
    cells without history, so the check is made on the source).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:         # IPython syntax (magics): nothing to check
        return [], []
    lines = source.splitlines()
    calls, hidden = [], []
    for node in tree.body:
        value = getattr(node, "value", None) if isinstance(node, (ast.Expr, ast.Assign)) else None
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "display" and value.args:
            value = value.args[0]
        if _is_call(value, "viz", "plot_") or _is_call(value, "plt", "show"):
            text = ast.get_source_segment(source, node)
            calls.append(text)
            if isinstance(node, ast.Expr) and lines[node.end_lineno - 1][node.end_col_offset:].lstrip().startswith(";"):
                hidden.append(text)
    return calls, hidden


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    # Every figure a cell makes at its top level is shown: an image output for each.
    result = yield
    outputs, cell = getattr(item, "test_outputs", None), getattr(item, "cell", None)
    if outputs is None or cell is None:
        return result
    calls, hidden = plotting_calls(cell.source)
    if hidden:
        pytest.fail(f"a figure hidden by a trailing ';' (JupyterLab shows nothing): {hidden}; make it the "
                    f"cell's last expression or pass it to display()", pytrace=False)
    images = sum(any(t in (out.get("data") or {}) for t in _IMAGE_TYPES) for out in outputs)
    if images < len(calls):
        pytest.fail(f"{len(calls)} plotting call(s) but {images} image(s) shown: {calls}", pytrace=False)
    return result
