"""Click commands of the `pssr` console script (installed as `pssr_cli`)."""
