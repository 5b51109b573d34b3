"""`onnxquant benchmark`: onnxquant's recipes and its peers (ORT's quantizers, the ORT-GenAI builder) measured
side by side in one run on this machine (run.py), the peers themselves (peers.py), and the launcher that
gives each quantize child its own peak RSS (peak_rss.py)."""
