"""The sandbox's copy of the vendor's table: its own, and the same as the client's (issue #25).

The two copies are written independently from the vendor's page, so comparing
them catches a wrong row in either; the sandbox importing the client's table
would make that comparison (and every integration test) blind to it.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

import imichat_async.sandbox
from imichat_async import _protocol as client
from imichat_async.sandbox import vendor
from tests.helpers import imported_modules


def test_sandbox_imports_nothing_of_the_client() -> None:
    """No sandbox module imports a module of imichat_async outside the sandbox (no _protocol)."""
    package = imichat_async.sandbox.__name__
    root = Path(imichat_async.sandbox.__file__).parent
    modules = [root / f"{m.name}.py" for m in pkgutil.iter_modules([str(root)])]
    assert root / "vendor.py" in modules and root / "query.py" in modules
    outside = {
        (path.name, name)
        for path in [root / "__init__.py", *modules]
        for name in imported_modules(path, package)
        if name.split(".")[0] == "imichat_async" and not name.startswith(package)
    }
    assert outside == set()


def test_import_check_sees_the_client_protocol() -> None:
    """The check above sees relative imports: the client's of its table, the sandbox's own."""
    here = Path(client.__file__).parent
    assert "imichat_async._protocol" in imported_modules(here / "_fetch.py", "imichat_async")
    assert "imichat_async.sandbox.vendor" in imported_modules(
        here / "sandbox" / "query.py", "imichat_async.sandbox"
    )


def test_status_codes_agree_with_the_client() -> None:
    """Every row of "Response Codes": same codes, HTTP statuses and descriptions in both."""
    assert set(vendor.CODES) == set(client.STATUS_TABLE)
    for code, row in client.STATUS_TABLE.items():
        mine = vendor.CODES[code]
        assert mine.http_status == row.http_status, code
        filled = row.description.format(param="tag", value="x'y")
        assert vendor.describe(code, param="tag", value="x'y") == filled, code
    assert vendor.SUCCESS == client.SUCCESS_CODE
    assert client.STATUS_TABLE[vendor.SUCCESS].error is None


def test_params_operators_and_values_agree_with_the_client() -> None:
    """ "Supported Params and Operators", the closed values and destination ids agree."""
    assert dict(vendor.OPERATORS) == dict(client.PARAM_OPERATORS)
    assert vendor.DATETIMES == client.DATETIME_PARAMS
    assert dict(vendor.CLOSED_VALUES) == dict(client.ENUM_PARAM_VALUES)
    assert dict(vendor.DESTINATIONS) == dict(client.DESTINATION_PARAMS)
    assert vendor.CONDITIONS == client.CONDITIONS


def test_wire_details_agree_with_the_client() -> None:
    """Page size, search path and header names agree."""
    assert vendor.PAGE_SIZE == client.PAGE_SIZE == 10
    assert vendor.SEARCH_PATH == client.SEARCH_PATH
    assert (vendor.AUTH_HEADER, vendor.TEAM_HEADER) == (client.AUTH_HEADER, client.TEAM_HEADER)
    assert vendor.TOTAL_HEADER == client.TOTAL_HEADER
    assert vendor.RETRY_AFTER_HEADER == client.RETRY_AFTER_HEADER


def test_describe_fills_the_pages_blanks() -> None:
    """`<param_name>`, `{0}` (the value) and `{1}` (the param) are filled once, as given."""
    assert vendor.describe(3445, param="foo") == "Provided filtration parameter: foo is not valid"
    assert vendor.describe(4303, param="status", value="{1}") == (
        "Invalid input value:'{1}' provided for filtration parameter:'status'"
    )
    assert vendor.describe(2003) == "Invalid Access Token"
