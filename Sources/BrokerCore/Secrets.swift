import ControlProtocol
import SystemLayer
import Foundation
import Synchronization
import HummingbirdBcrypt

/// Salted slow password hashes: bcrypt (OpenBSD's, from hummingbird-auth) over an
/// HMAC-SHA-256 of the password keyed with a per-password random salt.
///
/// Why the HMAC step: bcrypt reads at most 72 bytes, and a password here may be
/// 100 characters (up to 400 UTF-8 bytes), so two passwords sharing their first
/// 72 bytes would hash alike. The HMAC folds the whole password into 32 bytes
/// (44 in base64) first. Keying it with a random salt (rather than a bare
/// SHA-256) means a leaked unsalted SHA-256 of the same password elsewhere does
/// not help an attacker ("hash shucking"). This is passlib's `bcrypt_sha256`
/// construction.
///
/// Stored form: `bcrypt-sha256$<salt, base64>$<bcrypt string $2b$12$...>`.
public struct PasswordHasher: Sendable {
    /// bcrypt's cost (log2 of the rounds). 12 takes about a quarter second here.
    public let cost: UInt8

    public static let scheme = "bcrypt-sha256"

    public init(cost: UInt8 = 12) {
        precondition((4...31).contains(cost), "bcrypt cost must be 4 to 31")
        self.cost = cost
    }

    /// Hashes `password` with a fresh salt. Slow by design: call it off the
    /// async executor (`hashed(_:)`).
    public func hash(_ password: String) -> String {
        BlockingCallCheck.check("bcrypt hash (cost \(cost))")
        let salt = Secrets.randomBytes(16)
        let prehashed = Self.prehash(password, salt: salt)
        return "\(Self.scheme)$\(Data(salt).base64EncodedString())$\(Bcrypt.hash(prehashed, cost: cost))"
    }

    /// Whether `password` matches `stored`. False for a stored value in an unknown form.
    public func verify(_ password: String, against stored: String) -> Bool {
        BlockingCallCheck.check("bcrypt verify (cost \(cost))")
        let parts = stored.split(separator: "$", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0] == Self.scheme,
              let salt = Data(base64Encoded: String(parts[1])), salt.count == 16 else { return false }
        return Bcrypt.verify(Self.prehash(password, salt: [UInt8](salt)), hash: String(parts[2]))
    }

    /// `hash` on a thread of its own, so bcrypt never blocks the async executor.
    public func hashed(_ password: String) async -> String {
        await Self.offload { self.hash(password) }
    }

    /// `verify` on a thread of its own.
    public func verified(_ password: String, against stored: String) async -> Bool {
        await Self.offload { self.verify(password, against: stored) }
    }

    /// A hash of a random password, to verify against when a login names no
    /// user, so that the answer takes as long as for a wrong password.
    public func decoy() -> String {
        hash(Secrets.token())
    }

    /// At most one bcrypt per core at a time; the rest wait their turn.
    private static let gate = HashingGate(slots: max(1, ProcessInfo.processInfo.activeProcessorCount))

    /// Runs `body` on `BlockingExecutor.shared`. Not on Swift's cooperative
    /// threads nor Dispatch's global queues: on Linux both are as wide as the
    /// machine has cores, and a CPU-bound bcrypt there would hold back every
    /// server of the process and the database queues that GRDB runs on them.
    private static func offload<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await gate.enter()
        defer { gate.leave() }
        return await BlockingExecutor.shared.run(body)
    }

    /// base64(HMAC-SHA-256(key: salt, message: NFC(password))): 44 ASCII characters.
    static func prehash(_ password: String, salt: [UInt8]) -> String {
        let message = Array(password.precomposedStringWithCanonicalMapping.utf8)
        return Data(Secrets.hmacSHA256(key: salt, message: message)).base64EncodedString()
    }
}

/// Random tokens and digests for sessions and passwords. The primitives are
/// `ControlCrypto`'s (the control protocol's, from OpenSSL); this keeps the
/// names the broker's code uses.
public enum Secrets {
    /// `count` bytes from the system's CSPRNG.
    public static func randomBytes(_ count: Int) -> [UInt8] {
        ControlCrypto.randomBytes(count)
    }

    /// A new session token: 256 random bits as 43 characters of unpadded base64url.
    public static func token() -> String {
        ControlCrypto.base64url(randomBytes(32))
    }

    /// Whether `text` has the form `token()` makes (checked before any lookup).
    public static func looksLikeToken(_ text: String) -> Bool {
        text.utf8.count == 43 && text.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                || byte == 0x2D || byte == 0x5F
        }
    }

    /// Lower-case hex SHA-256 of `text`: what the store keeps instead of a token.
    public static func sha256Hex(_ text: String) -> String {
        ControlCrypto.hex(ControlCrypto.sha256(Array(text.utf8)))
    }

    /// HMAC-SHA-256 of `message` under `key`.
    public static func hmacSHA256(key: [UInt8], message: [UInt8]) -> [UInt8] {
        ControlCrypto.hmacSHA256(key: key, message: message)
    }

    /// The fingerprint of a gateway's control key that `--info` and the store
    /// may show: the first 16 hex digits of SHA-256 over a label and the key.
    /// It identifies a key without helping to recover it.
    public static func fingerprint(_ key: ControlKey) -> String {
        String(ControlCrypto.hex(ControlCrypto.sha256(Array("leostream-control-key\n".utf8) + key.bytes)).prefix(16))
    }
}

/// A counting gate for async callers: `enter` waits while every slot is taken.
final class HashingGate: Sendable {
    private struct State {
        var free: Int
        var waiting: [CheckedContinuation<Void, Never>] = []
    }
    private let state: Mutex<State>

    init(slots: Int) {
        state = Mutex(State(free: slots))
    }

    func enter() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let admitted = state.withLock { state -> Bool in
                if state.free > 0 {
                    state.free -= 1
                    return true
                }
                state.waiting.append(continuation)
                return false
            }
            if admitted { continuation.resume() }
        }
    }

    func leave() {
        let next = state.withLock { state -> CheckedContinuation<Void, Never>? in
            if state.waiting.isEmpty {
                state.free += 1
                return nil
            }
            // The slot passes straight to the first waiter.
            return state.waiting.removeFirst()
        }
        next?.resume()
    }
}
