"""HTTP: what machines fetch while booting (iPXE scripts, kernels, initrds, keys), on uvicorn."""
