"""kci-tunneld's benchmark suite (not tests): ``python3 -m bench``; see bench/README.md."""
