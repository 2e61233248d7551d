"""Block reconstruction shared by every toolkit (AdaRound, BRECQ, QDrop, Genie-M)."""
