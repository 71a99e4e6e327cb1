def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_static: the ahead-of-time GPU compile check (about 10 minutes)")
