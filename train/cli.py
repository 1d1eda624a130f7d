def main():\n    print("minilora-train")
