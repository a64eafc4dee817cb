def pytest_generate_tests(metafunc):
    """`named_case` comes from the test class's `named_cases` dict (see harness.py): one test per backend's case."""
    if "named_case" in metafunc.fixturenames:
        cases = metafunc.cls.named_cases
        metafunc.parametrize("named_case", list(cases.values()), ids=list(cases))
