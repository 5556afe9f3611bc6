print("relay-bench placeholder")
